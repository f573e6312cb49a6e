"""Per-image drag optimisation as a LightningModule (DragDiffusion, DragNoise).

One optimisation loop for every latent-optimising method. What differs between methods is a
strategy object or a value: *what* is optimised (:mod:`dragexp.targets`: the latent z_t or the
UNet bottleneck), which features supervise (``feature_idx``), the loss (:class:`DragObjective`),
and - through callbacks - how points are tracked and when to stop.

Per step, the order is the authors' (NOTES_dragdiffusion_dragnoise.md section 2):

1. forward with gradient: features F1 and eps, then one DDIM step x_{t-1};
2. the ``on_drag_features`` hook: callbacks act on *this* forward's features (point tracking,
   stop rule, trajectory logging), reading and updating a :class:`DragState`;
3. if a callback asked to stop, the step ends before any loss or optimiser step;
4. the loss, backward, optimiser step, then ``on_drag_step_end``.

The optimised tensor is the module's only trainable parameter and stays float32 under mixed
precision (FRAMEWORK.md, Lightning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from ..features import resize_concat
from ..losses import mask_preservation_loss, motion_supervision_loss
from ..schedule import DDIMSchedule, ddim_step
from .fitting import fit


@dataclass
class DragState:
    """What one optimisation step knows; callbacks read and update it.

    Points are float32 (N, 2) (row, col) in the supervision grid.
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

    def __call__(self, state: DragState, x_prev_init: torch.Tensor, mask_latent: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
        terms = {"motion": motion_supervision_loss(state.features, state.handles, state.targets,
                                                   self.motion_radius, self.reached)}
        if self.mask_term == "always" or bool(mask_latent.sum() != 0):
            terms["mask"] = mask_preservation_loss(state.x_prev, x_prev_init, mask_latent, self.lam)
        return terms


class DragOptimisation(L.LightningModule):
    """Optimise one image's latent (or bottleneck) so handle features move to the targets.

    Args:
        unet: frozen UNet (LoRA may be active).
        target: a :mod:`dragexp.targets` strategy that owns the optimised tensor's meaning.
        latent: z_t at the edit timestep, (1, 4, h, w).
        timestep: the edit timestep t.
        text_embedding: prompt embedding (1, L, D).
        handles, targets: float32 (N, 2) (row, col) in the supervision grid.
        mask: (1, 1, H_sup, W_sup) 0/1 editable mask on the supervision grid.
        schedule: the DDIM schedule (for the one-step denoise x_{t-1}).
        feature_idx: UNet feature indices (0 = mid, 1..4 = up_blocks) to supervise with.
        objective: the loss strategy.
        lr: Adam learning rate; n_steps: at most this many optimiser steps.
    """

    def __init__(self, unet: nn.Module, target, latent: torch.Tensor, timestep: int,
                 text_embedding: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor, schedule: DDIMSchedule, feature_idx=(3,),
                 objective: DragObjective | None = None, lr: float = 0.01, n_steps: int = 80):
        super().__init__()
        self.automatic_optimization = False
        self.unet = unet
        self.target = target
        self.register_buffer("z_t", latent.detach().float().clone())
        self.register_buffer("text_embedding", text_embedding.detach().clone())
        self.timestep = int(timestep)
        self.schedule = schedule
        self.feature_idx = [int(i) for i in feature_idx]
        self.objective = objective or DragObjective()
        self.lr = float(lr)
        self.n_steps = int(n_steps)
        self.sup_size = tuple(mask.shape[-2:])
        self.register_buffer("handles_init", handles.detach().float().clone())
        self.register_buffer("handles", handles.detach().float().clone())
        self.register_buffer("targets", targets.detach().float().clone())
        self.register_buffer("mask", mask.detach().float().clone())
        self.register_buffer("mask_latent", nn.functional.interpolate(
            self.mask, size=latent.shape[-2:], mode="nearest"))
        self.param = nn.Parameter(target.initial(self).float())
        self.param_init = self.param.detach().clone()
        self.num_steps = 0
        self.stopped_early = False
        self.features_init: torch.Tensor | None = None
        self.x_prev_init: torch.Tensor | None = None
        self.eps_init: torch.Tensor | None = None

    # -- the forward pass -----------------------------------------------------------------
    def drag_forward(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eps, supervision features, x_{t-1}) for the current value of the optimised tensor."""
        eps, feats = self.target.forward(self, param)
        features = resize_concat(feats, self.sup_size)
        x_prev = ddim_step(eps, self.timestep, self.target.latent(self, param), self.schedule)
        return eps, features, x_prev

    def _precision_context(self):
        trainer = self._trainer
        return trainer.precision_plugin.forward_context() if trainer is not None else torch.no_grad()

    def on_train_start(self) -> None:
        with torch.no_grad(), self._precision_context():
            self.eps_init, self.features_init, self.x_prev_init = self.drag_forward(self.param)
        self.features_init = self.features_init.float()
        self.x_prev_init = self.x_prev_init.float()

    # -- Lightning plumbing ------------------------------------------------------------------
    def configure_optimizers(self):
        return torch.optim.Adam([self.param], lr=self.lr)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(self.n_steps), batch_size=None)

    def _drag_callbacks(self) -> list[Any]:
        cbs = [cb for cb in self.trainer.callbacks if hasattr(cb, "on_drag_features")]
        return sorted(cbs, key=lambda cb: getattr(cb, "drag_hook_order", 50))

    def training_step(self, batch, batch_idx):
        step = int(batch)
        eps, features, x_prev = self.drag_forward(self.param)
        state = DragState(step=step, features=features, features_init=self.features_init,
                          handles=self.handles.clone(), handles_init=self.handles_init,
                          targets=self.targets, eps=eps, x_prev=x_prev)
        callbacks = self._drag_callbacks()
        for cb in callbacks:
            cb.on_drag_features(self.trainer, self, state)
        self.handles.copy_(state.handles)
        if state.stop:
            self.stopped_early = True
            self.trainer.should_stop = True
            return None
        terms = self.objective(state, self.x_prev_init, self.mask_latent)
        loss = sum(terms.values())
        state.loss = loss.detach()
        state.loss_terms = {k: float(v.detach()) for k, v in terms.items()}
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        self.num_steps = step + 1
        for cb in callbacks:
            if hasattr(cb, "on_drag_step_end"):
                cb.on_drag_step_end(self.trainer, self, state)
        return loss.detach()

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
    fit(module, max_steps=module.n_steps, callbacks=callbacks, progress=progress,
        keep=(module.unet,), precision=precision, accelerator=accelerator)
    return module
