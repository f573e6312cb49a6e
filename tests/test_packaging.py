"""The installed package holds every module of the tree (pyproject lists packages explicitly,
because callbacks/ is installed as dragexp.callbacks)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "dragexp").rglob("__init__.py") if "__pycache__" not in p.parts}
    found |= {"dragexp.callbacks"}
    missing = sorted(found - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(p for p in listed - found if p.startswith("dragexp"))
    assert not stale, f"listed in pyproject.toml but not in the tree: {stale}"
