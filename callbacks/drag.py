"""Callbacks that act inside a drag optimisation step (the ``on_drag_features`` hook).

:class:`DragOptimisation` calls ``on_drag_features(trainer, module, state)`` on every callback
that has it, between the forward and the loss, in ``drag_hook_order``; and
``on_drag_step_end(trainer, module, state)`` after the optimiser step.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from dragexp.drag.losses import all_reached
from dragexp.drag.trackers import NearestFeatureTracker, Tracker, handles_moved


class DragCallback(L.Callback):
    """Base class: a Lightning callback with the two drag hooks (no-ops here)."""

    drag_hook_order = 50

    def on_drag_features(self, trainer, module, state) -> None:  # noqa: D401
        pass

    def on_drag_step_end(self, trainer, module, state) -> None:
        pass

    def check_before_edit(self, target, handles: torch.Tensor, sample) -> None:
        """Raise, before the edit does any work, if this callback cannot run on ``sample``
        (a :class:`~dragexp.data.sample.DragSample`) with its supervision ``handles`` and the
        method's optimisation ``target``; nothing here."""

    def images(self, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Images this callback kept for logging, resized to ``size``; none here."""
        return {}


def check_before_edit(callbacks, target, handles: torch.Tensor, sample) -> None:
    """Ask every drag callback whether it can run on this sample with this target."""
    for cb in callbacks:
        if isinstance(cb, DragCallback):
            cb.check_before_edit(target, handles, sample)


def callback_images(callbacks, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Images that drag callbacks kept for logging (auto masks), resized to ``size``."""
    out: dict[str, np.ndarray] = {}
    for cb in callbacks:
        if isinstance(cb, DragCallback):
            out.update(cb.images(size))
    return out


def trajectory_recorder(callbacks) -> "TrajectoryRecorder | None":
    """The callbacks' trajectory recorder (whose handles and losses go into the result)."""
    return next((cb for cb in callbacks if isinstance(cb, TrajectoryRecorder)), None)


class PointTracking(DragCallback):
    """Move each handle to where its initial feature now is, from ``start_step`` on.

    The tracker strategy (default: DragDiffusion's L1 nearest neighbour in a 7x7 window, from
    the second step; EasyDrag's :class:`dragexp.drag.trackers.NextPointTracker` from step 0) is given
    by config; it sees this step's features, so tracking costs no extra forward. Sets
    ``state.moved`` when a handle changed.
    """

    drag_hook_order = 10

    def __init__(self, tracker=None, start_step: int = 1):
        self.tracker = tracker or NearestFeatureTracker()
        self.start_step = int(start_step)

    def check_before_edit(self, target, handles: torch.Tensor, sample) -> None:
        if isinstance(self.tracker, Tracker):
            self.tracker.check_start(handles, sample)

    def on_drag_features(self, trainer, module, state) -> None:
        if state.step < self.start_step:
            return
        with torch.no_grad():
            new = self.tracker(state.features_init, state.features.detach(),
                               state.handles_init, state.handles, targets=state.targets)
        state.moved = state.moved or handles_moved(state.handles, new)
        state.handles = new


class StopWhenReached(DragCallback):
    """Stop before the loss once every handle is within ``threshold`` of its target (L2).

    DragDiffusion/DragNoise: 2.0 on the half-resolution grid; EasyDrag: 1.0 image pixel.
    """

    drag_hook_order = 20

    def __init__(self, threshold: float = 2.0):
        self.threshold = float(threshold)

    def on_drag_features(self, trainer, module, state) -> None:
        if all_reached(state.handles, state.targets, self.threshold):
            state.stop = True


class TrajectoryRecorder(DragCallback):
    """Keeps the per-step handles, losses and distances of the current drag problem.

    ``handles[k]`` is the handle positions after the tracking of step k (row 0 = clicked), the
    convention of the conformance traces; ``losses[k]`` the total loss of step k.
    """

    drag_hook_order = 30

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.handles: list[list[list[float]]] = []
        self.losses: list[float] = []
        self.terms: list[dict[str, float]] = []
        self.distances: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.reset()

    def on_drag_features(self, trainer, module, state) -> None:
        self.handles.append(state.handles.detach().cpu().tolist())
        self.distances.append(float((state.targets - state.handles).norm(dim=-1).mean()))

    def on_drag_step_end(self, trainer, module, state) -> None:
        self.losses.append(float(state.loss))
        self.terms.append(dict(state.loss_terms))
