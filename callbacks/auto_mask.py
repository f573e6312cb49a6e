"""EasyDrag's automatic editable mask as a drag callback (docs/methods.md, EasyDrag 13).

At step 0 and at every step in which tracking moved a handle, :class:`AutoMask` asks the step's
:class:`~dragexp.modules.drag_optimisation.DragState` for the summed point loss and its gradient
with respect to z_t (a backward that keeps the graph, before the terms that use the mask), turns
it into a mask with :func:`dragexp.drag.losses.gradient_mask` (|channel mean|, min-max to 0..255,
editable where > 100) and hands that mask to the objective through ``state.mask``; in between
the last mask is reused (docs/methods.md, EasyDrag 9 and 13).

It works with any objective that has point terms: with EasyDrag's the mask bounds the
consistency term; with DragDiffusion's (``callbacks=[default,auto_mask]``) it replaces the drawn
mask of the mask-preservation term. It needs the optimised tensor to be z_t: DragNoise optimises
the bottleneck, whose gradient is a 1280-channel map at 1/64 of the image area and is not a
statement about which image pixels may change, so it is refused with an error.

The masks, the gradients and point losses that made them, and the step of each are kept for
logging (:meth:`AutoMask.images` gives them as images).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dragexp.drag.losses import gradient_mask

from .drag import DragCallback


class AutoMaskError(ValueError):
    """The auto mask was asked for where there is no gradient w.r.t. z_t (DragNoise)."""


class AutoMask(DragCallback):
    """Recompute the editable mask from the point-loss gradient at step 0 and on handle moves.

    Args:
        threshold: on the 0..255 min-max normalised |channel-mean gradient| (100).
        enabled: False makes the callback a no-op (keeps the drawn mask), e.g.
            ``callbacks.auto_mask.enabled=false``.
    """

    # after tracking (10) and the stop rule (20): it needs the tracked handles and does no work
    # on a step that stops; before trajectory recording (30).
    drag_hook_order = 25

    def __init__(self, threshold: float = 100.0, enabled: bool = True):
        self.threshold = float(threshold)
        self.enabled = bool(enabled)
        self.reset()

    def reset(self) -> None:
        self.mask: torch.Tensor | None = None
        self.masks: list[torch.Tensor] = []        # (1, 1, h, w) 0/1 at latent resolution
        self.grads: list[torch.Tensor] = []        # d(point loss)/dz_t behind each mask
        self.point_losses: list[float] = []
        self.mask_steps: list[int] = []
        self.recomputed: list[int] = []            # per optimisation step (stopping step excluded)

    @staticmethod
    def check_target(target) -> None:
        if not getattr(target, "optimises_latent", False):
            raise AutoMaskError(
                f"the auto mask needs the gradient of the point loss with respect to z_t, but "
                f"this method optimises {getattr(target, 'name', type(target).__name__)!r} "
                "(DragNoise's bottleneck: its gradient has no image-pixel meaning); drop "
                "callbacks.auto_mask or use a latent-optimising method (dragdiffusion, easydrag)")

    def check_before_edit(self, target, handles, sample) -> None:
        if self.enabled:
            self.check_target(target)

    def on_train_start(self, trainer, pl_module) -> None:
        self.reset()
        if self.enabled:
            self.check_target(pl_module.target)

    def on_drag_features(self, trainer, module, state) -> None:
        if not self.enabled or state.stop:
            return
        recompute = state.step == 0 or state.moved
        if recompute:
            loss = state.point_loss()
            grad = state.gradient(loss)
            self.mask = gradient_mask(grad, self.threshold)
            self.masks.append(self.mask.detach().cpu())
            self.grads.append(grad.detach().float().cpu())
            self.point_losses.append(float(loss.detach()))
            self.mask_steps.append(int(state.step))
        self.recomputed.append(int(recompute))
        if self.mask is not None:
            state.mask = self.mask.to(state.features.device)

    def images(self, size: tuple[int, int], prefix: str = "auto_mask") -> dict[str, np.ndarray]:
        """``{"<prefix>_<k>_step<s>": uint8 (H, W) 0/255}``, nearest-resized to ``size``."""
        out = {}
        for k, (m, s) in enumerate(zip(self.masks, self.mask_steps)):
            up = F.interpolate(m.float(), size=tuple(size), mode="nearest")[0, 0]
            out[f"{prefix}_{k:02d}_step{s:03d}"] = (up.numpy() * 255).astype(np.uint8)
        return out
