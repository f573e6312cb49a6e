"""Named stages of one edit (LoRA, inversion, optimisation, ...): wall-clock time, and a door
for profilers.

Every method times its stages with a :class:`StageTimer`. A benchmark that wants more than
seconds per stage (FLOPs, peak memory) registers an *observer* with :func:`observe_stages`;
each stage then runs inside ``observer(name)``, a context manager, so the methods themselves
know nothing of profiling (``scripts/bench.py``; figures in docs/benchmarks/README.md).
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from typing import Callable, ContextManager, Iterator

import torch

StageObserver = Callable[[str], ContextManager]
_OBSERVERS: list[StageObserver] = []


@contextmanager
def observe_stages(observer: StageObserver) -> Iterator[None]:
    """Run every stage timed by any :class:`StageTimer` inside ``observer(stage_name)``."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StageTimer:
    """Wall-clock seconds per named stage (synchronising CUDA so GPU time is counted).

    A stage entered twice (EasyDrag's encode, DragonDiffusion's second image) accumulates.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        with ExitStack() as stack:
            for observer in list(_OBSERVERS):
                stack.enter_context(observer(name))
            _sync()
            t0 = time.perf_counter()
            yield
            _sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
