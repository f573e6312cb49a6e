"""Kind -> adapter. An adapter runs one case through dragexp's own code and returns tensors.

Adapters are thin: they translate a case's inputs into calls of the same functions the methods
use and collect what the case expects. They never hold arithmetic of their own.
"""

from __future__ import annotations

from typing import Callable

import torch

from .case import Case, CaseError

Adapter = Callable[[Case], dict[str, torch.Tensor]]
_ADAPTERS: dict[str, Adapter] = {}

# Modules that register adapters; imported lazily so one broken family cannot hide the others.
ADAPTER_MODULES = (
    "dragexp.conformance.dragdiffusion",
    "dragexp.conformance.lora",
    "dragexp.conformance.easydrag",
    "dragexp.conformance.dragondiffusion",
    "dragexp.conformance.dragbench_eval",
)


def adapter(kind: str) -> Callable[[Adapter], Adapter]:
    def register(fn: Adapter) -> Adapter:
        _ADAPTERS[kind] = fn
        return fn
    return register


def get_adapter(kind: str) -> Adapter:
    import importlib

    errors = []
    for mod in ADAPTER_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as exc:  # a missing family must not hide the others
            errors.append(f"{mod}: {exc}")
    if kind not in _ADAPTERS:
        why = f"; import errors: {'; '.join(errors)}" if errors else ""
        raise CaseError(f"no adapter for kind {kind!r} (known: {', '.join(sorted(_ADAPTERS))}){why}")
    return _ADAPTERS[kind]
