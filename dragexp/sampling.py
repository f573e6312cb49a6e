"""Noise prediction and the shared DDIM sampling loop.

:class:`NoisePredictor` turns the UNet into ``eps(x, t, i)`` with optional classifier-free
guidance and an optional mid-block (bottleneck) substitution; :func:`ddim_sample` runs the
denoising from any schedule index with an attention controller's step counter kept in sync.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import AttentionController
from .features import feature_module, replace_output
from .schedule import DDIMSchedule, ddim_step


class NoisePredictor:
    """eps(x, t, i) for a batch of latents sharing one prompt.

    Args:
        unet: the (possibly LoRA-adapted) UNet.
        cond: prompt embedding (1, L, D); repeated over the batch.
        uncond: negative-prompt embedding for CFG; needed only if ``guidance != 1``.
        guidance: CFG scale. With CFG the UNet sees ``[x, x]`` with ``[uncond..., cond...]``
            and eps = eps_u + g (eps_c - eps_u) (DragDiffusion's generated-image path).
        bottleneck: optional tensor substituted for the mid-block output (DragNoise's
            propagation), used at schedule index ``i`` while ``bottleneck_until(i)`` holds;
            ``bottleneck_feature`` says which feature map it replaces (0 = mid block).
    """

    def __init__(self, unet: nn.Module, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                 guidance: float = 1.0, bottleneck: torch.Tensor | None = None,
                 bottleneck_until: Callable[[int], bool] | None = None,
                 bottleneck_feature: int = 0):
        self.unet = unet
        self.cond = cond
        self.uncond = uncond
        self.guidance = float(guidance)
        self.bottleneck = bottleneck
        self.bottleneck_until = bottleneck_until or (lambda i: True)
        self.bottleneck_module = feature_module(unet, bottleneck_feature)
        self.last_raw_eps: torch.Tensor | None = None
        self.last_injected = False

    @property
    def cfg(self) -> bool:
        return self.guidance != 1.0

    def _bottleneck_for(self, i: int, batch: int) -> torch.Tensor | None:
        if self.bottleneck is None or not self.bottleneck_until(i):
            return None
        h = self.bottleneck
        return h.expand(batch, *h.shape[1:]) if h.shape[0] == 1 else h

    def __call__(self, x: torch.Tensor, t: int, i: int = 0) -> torch.Tensor:
        b = x.shape[0]
        if self.cfg:
            if self.uncond is None:
                raise ValueError("guidance != 1 needs a negative-prompt embedding (uncond)")
            x_in = torch.cat([x, x])
            text = torch.cat([self.uncond.expand(b, -1, -1), self.cond.expand(b, -1, -1)])
        else:
            x_in, text = x, self.cond.expand(b, -1, -1)
        h = self._bottleneck_for(i, x_in.shape[0])
        self.last_injected = h is not None
        with replace_output(self.bottleneck_module, h):
            eps = self.unet(x_in, t, encoder_hidden_states=text, return_dict=False)[0]
        self.last_raw_eps = eps
        if self.cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + self.guidance * (eps_c - eps_u)
        return eps


@torch.no_grad()
def ddim_sample(eps_fn: Callable[[torch.Tensor, int, int], torch.Tensor], x: torch.Tensor,
                schedule: DDIMSchedule, start_index: int,
                controller: AttentionController | None = None,
                on_step: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Denoise ``x`` from ``schedule.timesteps[start_index]`` to t = 0 with eta-0 DDIM steps.

    The loop index ``i`` runs over the whole schedule and the first ``start_index`` steps are
    skipped, as the references do (it matters for index-based rules such as DragNoise's
    ``i < 50 - end_step``). The controller's step counter counts executed steps from 0.
    ``on_step(i, t, x_after)`` is called after every executed step.
    """
    if controller is not None:
        controller.step = 0
    for i, t in enumerate(schedule.timesteps):
        if i < start_index:
            continue
        eps = eps_fn(x, t, i)
        x = ddim_step(eps, t, x, schedule)
        if controller is not None:
            controller.step += 1
        if on_step is not None:
            on_step(i, t, x)
    return x
