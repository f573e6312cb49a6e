"""Per-image drag optimisation as a LightningModule (DragDiffusion, DragNoise, EasyDrag).

One optimisation loop for every latent-optimising method. What differs between methods is a
strategy object or a value: *what* is optimised and how the UNet runs on it
(:mod:`dragexp.drag.targets`: the latent z_t, the latent under EasyDrag's reference attention, or the
UNet bottleneck), which features supervise (``feature_idx``) and how they are composed
(``compose_features``: DragDiffusion resizes each to the half-resolution grid, EasyDrag
concatenates and upsamples x8 to image pixels), the loss (:class:`DragObjective`,
:class:`CosineDragObjective`), and - through callbacks - how points are tracked, when to stop,
and whether the editable mask is drawn or computed (auto mask).

Per step, the order is the authors' (docs/methods.md, DragDiffusion 3 and EasyDrag 9):

1. forward with gradient: features F1 and eps, then one DDIM step x_{t-1};
2. the ``on_drag_features`` hook: callbacks act on *this* forward's features (point tracking,
   stop rule, auto mask, trajectory logging), reading and updating a :class:`DragState`; a
   callback may ask the state for the point loss and its gradient w.r.t. the optimised tensor
   (a backward that keeps the graph), which the step then reuses;
3. if a callback asked to stop, the step ends before any loss or optimiser step;
4. the loss (the point terms, then the terms that use the mask), backward, optimiser step, then
   ``on_drag_step_end``.

The optimised tensor is the module's only trainable parameter and stays float32 under mixed
precision (docs/methods.md, Framework 3).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from ..core.features import resize_concat
from ..performance.capture import StepCapture, optimizer_step, outlives_replay
from ..core.schedule import DDIMSchedule, ddim_step
from ..drag.losses import (consistency_loss, cosine_point_loss, mask_preservation_loss,
                           motion_supervision_loss)
from ..drag.targets import DragProblem
from .fitting import fit


@dataclass
class DragState:
    """What one optimisation step knows; callbacks read and update it.

    Points are float32 (N, 2) (row, col) in the supervision grid.

    ``mask`` is this step's editable mask (1, 1, h, w), 1 = may change, at any resolution (the
    drawn mask on the supervision grid unless a callback, e.g. the auto mask, replaced it);
    each objective resizes it to what it needs. ``moved`` tells whether tracking moved a handle
    in this step.
    """

    step: int
    features: torch.Tensor          # F1 at supervision resolution, with gradient
    features_init: torch.Tensor     # F0, no gradient
    handles: torch.Tensor
    handles_init: torch.Tensor
    targets: torch.Tensor
    eps: torch.Tensor
    x_prev: torch.Tensor
    stop: bool = False
    loss: torch.Tensor | None = None
    loss_terms: dict[str, float] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    moved: bool = False
    module: Any = field(default=None, repr=False)
    _point_terms: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def point_terms(self) -> dict[str, torch.Tensor]:
        """The objective's point terms for the current handles, computed once per step.

        Callbacks that ask for them (the auto mask) must run after every callback that moves
        handles (``drag_hook_order`` above the tracker's); the step's loss reuses them.
        """
        if self._point_terms is None:
            self._point_terms = _point_terms(self.module.objective, self)
        return self._point_terms

    def point_loss(self) -> torch.Tensor:
        """Sum of :meth:`point_terms` (EasyDrag's sum of L_gen; DragDiffusion's motion term)."""
        terms = list(self.point_terms().values())
        return sum(terms[1:], terms[0]) if terms else self.features.new_zeros(())

    def gradient(self, loss: torch.Tensor) -> torch.Tensor:
        """d loss / d (optimised tensor), keeping the graph for the step's own backward.

        Under a loss-scaling precision (fp16 mixed) the loss is scaled for the backward and the
        gradient unscaled, so small gradients do not underflow. A loss without a graph (no term
        left) has a zero gradient.
        """
        param = self.module.param
        if not loss.requires_grad:
            return torch.zeros_like(param)
        trainer = getattr(self.module, "_trainer", None)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        (grad,) = torch.autograd.grad(loss * scale if scale != 1.0 else loss, param,
                                      retain_graph=True)
        return grad / scale if scale != 1.0 else grad


def _point_terms(objective, state: DragState) -> dict[str, torch.Tensor]:
    if hasattr(objective, "point_terms"):
        return objective.point_terms(state)
    return {}


class DragObjective:
    """Motion supervision + mask preservation (DragDiffusion eq. 3 and 4, as the code computes).

    Args:
        motion_radius: r_m, the motion-supervision patch radius.
        lam: weight of the mask term.
        mask_term: ``"if_masked"`` adds the mask term only when a mask was drawn
            (DragDiffusion); ``"always"`` adds it even for an empty mask, protecting the whole
            latent (DragNoise).
        reached: a handle closer than this to its target gets no motion term.
    """

    def __init__(self, motion_radius: int = 1, lam: float = 0.1, mask_term: str = "if_masked",
                 reached: float = 2.0):
        if mask_term not in ("if_masked", "always"):
            raise ValueError(f"mask_term must be 'if_masked' or 'always', got {mask_term!r}")
        self.motion_radius = int(motion_radius)
        self.lam = float(lam)
        self.mask_term = mask_term
        self.reached = float(reached)

    def point_terms(self, state: DragState) -> dict[str, torch.Tensor]:
        return {"motion": motion_supervision_loss(state.features, state.handles, state.targets,
                                                  self.motion_radius, self.reached)}

    def other_terms(self, state: DragState, x_prev_init: torch.Tensor,
                    mask_latent: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.mask_term == "always" or bool(mask_latent.sum() != 0):
            return {"mask": mask_preservation_loss(state.x_prev, x_prev_init, mask_latent,
                                                   self.lam)}
        return {}

    def __call__(self, state: DragState, x_prev_init: torch.Tensor, mask_latent: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
        return {**self.point_terms(state), **self.other_terms(state, x_prev_init, mask_latent)}


class CosineDragObjective:
    """EasyDrag's losses (docs/methods.md, EasyDrag 12-14).

    Point term: :func:`dragexp.drag.losses.cosine_point_loss` (1 / (1 + S) per handle towards its
    next point, ``on_target_weight`` / (1 + S) once on the target). Consistency term:
    :func:`dragexp.drag.losses.consistency_loss` over the pixels outside ``state.mask`` (the drawn
    mask, or the auto mask when that callback is active).

    Args:
        radius: motion patch radius r_m (0: single pixels, the authors' setting).
        jump, snap: :func:`dragexp.drag.trackers.next_point` parameters (12 px, 18 px).
        on_target_weight: weight of a handle's term once it sits on its target (0.1).
        share_weight: weight of the consistency term (0.1).
    """

    def __init__(self, radius: int = 0, jump: float = 12.0, snap: float = 18.0,
                 on_target_weight: float = 0.1, share_weight: float = 0.1):
        self.radius = int(radius)
        self.jump, self.snap = float(jump), float(snap)
        self.on_target_weight = float(on_target_weight)
        self.share_weight = float(share_weight)

    def point_terms(self, state: DragState) -> dict[str, torch.Tensor]:
        return {"point": cosine_point_loss(state.features_init, state.features,
                                           state.handles_init, state.handles, state.targets,
                                           self.radius, self.jump, self.snap,
                                           self.on_target_weight)}

    def other_terms(self, state: DragState, x_prev_init: torch.Tensor,
                    mask_latent: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = state.mask if state.mask is not None else mask_latent
        share = consistency_loss(state.features_init, state.features, mask, self.share_weight)
        return {} if share is None else {"consistency": share}

    def __call__(self, state: DragState, x_prev_init: torch.Tensor, mask_latent: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
        return {**self.point_terms(state), **self.other_terms(state, x_prev_init, mask_latent)}


class DragOptimisation(L.LightningModule):
    """Optimise one image's latent (or bottleneck) so handle features move to the targets.

    Args:
        unet: frozen UNet (LoRA may be active).
        target: a :mod:`dragexp.drag.targets` strategy that owns the optimised tensor's meaning.
        latent: z_t at the edit timestep, (1, 4, h, w).
        timestep: the edit timestep t.
        text_embedding: prompt embedding (1, L, D).
        handles, targets: float32 (N, 2) (row, col) in the supervision grid.
        mask: (1, 1, H_sup, W_sup) 0/1 editable mask on the supervision grid.
        schedule: the DDIM schedule (for the one-step denoise x_{t-1}).
        feature_idx: UNet feature indices (0 = mid, 1..4 = up_blocks) to supervise with.
        objective: the loss strategy.
        lr: Adam learning rate; n_steps: at most this many optimiser steps.
        compose_features: ``f(native feature maps, supervision size)`` -> supervision features;
            :func:`dragexp.core.features.resize_concat` (DragDiffusion) by default,
            :func:`dragexp.core.features.concat_then_resize` for EasyDrag.
        reuse_initial_forward, fused_optimizer: the fast path's switches (:mod:`dragexp.performance.speed`).
        capture: run each step as compiled graphs (``speed=graphs``,
            :mod:`dragexp.performance.capture`): the target's ``step_forward`` with its hooks set
            up once, then features and x_{t-1}, as one graph with its backward; the optimiser
            step as another. The point losses and callbacks run eagerly between them.
    """

    def __init__(self, unet: nn.Module, target, latent: torch.Tensor, timestep: int,
                 text_embedding: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor, schedule: DDIMSchedule, feature_idx=(3,),
                 objective: DragObjective | None = None, lr: float = 0.01, n_steps: int = 80,
                 compose_features=None, reuse_initial_forward: bool = False,
                 fused_optimizer: bool = False, capture: StepCapture | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.unet = unet
        self.target = target
        # Fixed before the optimisation starts; strategies see this, never the module.
        self.problem = DragProblem(unet=unet, z_t=latent.detach().float().clone(),
                                   timestep=int(timestep),
                                   text_embedding=text_embedding.detach().clone(),
                                   feature_idx=tuple(int(i) for i in feature_idx))
        self.schedule = schedule
        self.objective = objective or DragObjective()
        self.compose_features = compose_features or resize_concat
        self.lr = float(lr)
        self.n_steps = int(n_steps)
        self.fused_optimizer = bool(fused_optimizer)
        self.capture = capture
        self._step_hooks: ExitStack | None = None
        self._captured_forward = None
        self.sup_size = tuple(mask.shape[-2:])
        self.register_buffer("handles_init", handles.detach().float().clone())
        self.register_buffer("handles", handles.detach().float().clone())
        self.register_buffer("targets", targets.detach().float().clone())
        self.register_buffer("mask", mask.detach().float().clone())
        self.register_buffer("mask_latent", nn.functional.interpolate(
            self.mask, size=latent.shape[-2:], mode="nearest"))
        self.param = nn.Parameter(target.initial(self.problem).float())
        self.param_init = self.param.detach().clone()
        self.num_steps = 0
        self.stopped_early = False
        self.features_init: torch.Tensor | None = None
        self.x_prev_init: torch.Tensor | None = None
        self.eps_init: torch.Tensor | None = None
        # The fast path (speed.reuse_initial_forward): step 0 runs on the initial value, so its
        # forward already gives F0; a target whose F0 forward differs (EasyDrag) cannot.
        self.reuse_initial_forward = bool(reuse_initial_forward) and \
            not hasattr(target, "initial_forward")

    # -- the forward pass -----------------------------------------------------------------
    def drag_forward(self, param: torch.Tensor, initial: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eps, supervision features, x_{t-1}) for the current value of the optimised tensor.

        ``initial`` asks for the reference forward of F0, which a target may run differently
        (EasyDrag: batch 1, no reference attention).
        """
        if initial and hasattr(self.target, "initial_forward"):
            eps, feats = self.target.initial_forward(self.problem, param)
        else:
            eps, feats = self.target.forward(self.problem, param)
        features = self.compose_features(feats, self.sup_size)
        x_prev = ddim_step(eps, self.timestep, self.target.latent(self.problem, param),
                           self.schedule)
        return eps, features, x_prev

    @property
    def z_t(self) -> torch.Tensor:
        """The inverted latent the drag starts from (:attr:`problem`)."""
        return self.problem.z_t

    @property
    def timestep(self) -> int:
        return self.problem.timestep

    @property
    def feature_idx(self) -> list[int]:
        return list(self.problem.feature_idx)

    def outcome(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(edited latent to denoise, optimised bottleneck to propagate or None)."""
        return self.target.outcome(self.problem, self.result)

    def _precision_context(self):
        trainer = self._trainer
        return trainer.precision_plugin.forward_context() if trainer is not None else torch.no_grad()

    def on_train_start(self) -> None:
        if not self.reuse_initial_forward:
            with torch.no_grad(), self._precision_context():
                self.eps_init, self.features_init, self.x_prev_init = self.drag_forward(
                    self.param, initial=True)
            self.features_init = self.features_init.float()
            self.x_prev_init = self.x_prev_init.float()
        if self.capture is not None:
            self._capture_steps()

    def _capture_steps(self) -> None:
        """Set up the target's per-step hooks once and compile the step's forward."""
        trainer = self._trainer
        if trainer is not None and str(trainer.precision) in ("16-mixed", "16"):
            raise ValueError("speed=graphs needs precision bf16-mixed or 32-true: fp16's loss "
                             "scaler checks the gradients for inf on the host every step")
        if not hasattr(self.target, "step_forward"):
            raise ValueError(f"speed=graphs: the drag target {type(self.target).__name__} has no "
                             "step_forward (its per-step forward with hooks set up once)")
        self.release_steps()
        self._step_hooks = ExitStack()
        forward = self.target.step_forward(self.problem, self._step_hooks)
        problem, schedule, sup_size = self.problem, self.schedule, self.sup_size

        def step_forward(param):
            eps, feats = forward(param)
            features = self.compose_features(feats, sup_size)
            x_prev = ddim_step(eps, problem.timestep, self.target.latent(problem, param), schedule)
            return eps, features, x_prev
        self._captured_forward = self.capture.compile(step_forward)

    def release_steps(self) -> None:
        """Remove the captured step's hooks and controllers (the UNet is as it was)."""
        if self._step_hooks is not None:
            self._step_hooks.close()
        self._step_hooks = None
        self._captured_forward = None

    def on_train_end(self) -> None:
        self.release_steps()

    # -- Lightning plumbing ------------------------------------------------------------------
    def configure_optimizers(self):
        if self.capture is not None:
            return torch.optim.Adam([self.param], lr=self.lr, **self.capture.optimizer_kwargs())
        return torch.optim.Adam([self.param], lr=self.lr,
                                fused=self.fused_optimizer or None)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(self.n_steps), batch_size=None)

    def _drag_callbacks(self) -> list[Any]:
        cbs = [cb for cb in self.trainer.callbacks if hasattr(cb, "on_drag_features")]
        return sorted(cbs, key=lambda cb: getattr(cb, "drag_hook_order", 50))

    def training_step(self, batch, batch_idx):
        step = int(batch)
        forward = self._captured_forward or self.drag_forward
        eps, features, x_prev = forward(self.param)
        if self.features_init is None:
            self.eps_init = outlives_replay(eps, self.capture)
            self.features_init = outlives_replay(features, self.capture).float()
            self.x_prev_init = outlives_replay(x_prev, self.capture).float()
        state = DragState(step=step, features=features, features_init=self.features_init,
                          handles=self.handles.clone(), handles_init=self.handles_init,
                          targets=self.targets, eps=eps, x_prev=x_prev, mask=self.mask,
                          module=self)
        callbacks = self._drag_callbacks()
        for cb in callbacks:
            cb.on_drag_features(self.trainer, self, state)
        self.handles.copy_(state.handles)
        if state.stop:
            self.stopped_early = True
            self.trainer.should_stop = True
            return None
        terms = self._loss_terms(state)
        loss = sum(terms.values())
        state.loss = loss.detach()
        state.loss_terms = {k: float(v.detach()) for k, v in terms.items()}
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer_step(opt, self.capture)
        self.num_steps = step + 1
        for cb in callbacks:
            if hasattr(cb, "on_drag_step_end"):
                cb.on_drag_step_end(self.trainer, self, state)
        return loss.detach()

    def _loss_terms(self, state: DragState) -> dict[str, torch.Tensor]:
        """Point terms (reused if a callback already asked for them), then the masked terms."""
        if state.mask is None or state.mask is self.mask:
            mask_latent = self.mask_latent
        else:
            mask_latent = nn.functional.interpolate(state.mask.to(self.mask_latent),
                                                    size=self.mask_latent.shape[-2:],
                                                    mode="nearest")
        if not hasattr(self.objective, "other_terms"):   # a plain callable objective
            return self.objective(state, self.x_prev_init, mask_latent)
        terms = dict(state.point_terms())
        terms.update(self.objective.other_terms(state, self.x_prev_init, mask_latent))
        return terms

    @property
    def result(self) -> torch.Tensor:
        """The optimised tensor (latent or bottleneck), detached, float32."""
        return self.param.detach().float()


def fit_drag(module: DragOptimisation, callbacks: list, *, precision: str = "32-true",
             accelerator: str = "auto", progress: bool = True):
    """Fit a drag problem with a fresh Trainer (:func:`dragexp.modules.fitting.fit`).

    Loggers are off: per-step curves reach the experiment's W&B run through the trajectory
    callback, one run per experiment rather than per image.
    """
    try:
        fit(module, max_steps=module.n_steps, callbacks=callbacks, progress=progress,
            keep=(module.unet,), precision=precision, accelerator=accelerator)
    finally:   # a captured step's hooks never outlive the fit, whatever happened in it
        module.release_steps()
    return module
