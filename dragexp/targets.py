"""What a drag optimisation optimises: strategies for :class:`DragOptimisation`.

* :class:`LatentTarget` - DragDiffusion: the noisy latent z_t itself (METHODS.md step 3).

Each strategy gives the initial value of the optimised tensor, the UNet forward that turns its
current value into (eps, native-resolution features), and the latent on which the one-step
denoise x_{t-1} is taken.
"""

from __future__ import annotations

import torch

from .features import unet_eps_and_features


class LatentTarget:
    """Optimise z_t; every step runs the whole UNet on it."""

    name = "latent"

    def initial(self, module) -> torch.Tensor:
        return module.z_t.clone()

    def forward(self, module, param: torch.Tensor):
        return unet_eps_and_features(module.unet, param, module.timestep, module.text_embedding,
                                     module.feature_idx)

    def latent(self, module, param: torch.Tensor) -> torch.Tensor:
        return param

    def outcome(self, module) -> tuple[torch.Tensor, None]:
        """(edited latent for denoising, bottleneck to propagate): the optimised z_t, none."""
        return module.result, None
