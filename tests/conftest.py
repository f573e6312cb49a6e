"""Shared fixtures: tiny models built from configs, the shared data folder when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFORMANCE = SHARED / "conformance"


def conformance_cases(prefix: str) -> list[Path]:
    """Case folders whose name starts with ``prefix`` (empty when ../shared is absent)."""
    if not CONFORMANCE.is_dir():
        return []
    return sorted(p for p in CONFORMANCE.iterdir() if p.is_dir() and p.name.startswith(prefix))


def require_shared(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared data folder is not next to this checkout")


@pytest.fixture(scope="session")
def tiny():
    from dragexp.models import build_tiny

    return build_tiny(seed=0, resolution=64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
