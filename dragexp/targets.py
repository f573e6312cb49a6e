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


class BottleneckTarget:
    """Optimise a UNet feature map for the fixed z_t: the mid-block output by default (DragNoise).

    The encoder pass runs once (:class:`dragexp.unet_split.UNetDecoder`); every optimisation
    step runs only the decoder from the optimised feature on. ``feature`` follows dragexp's
    index convention (0 = mid block, the bottleneck; k = output of ``up_blocks[k-1]``, an
    ablation). The latent is returned unchanged and the optimised map is propagated in denoising.
    """

    def __init__(self, feature: int = 0):
        self.feature = int(feature)
        self.name = "bottleneck" if self.feature == 0 else f"feature{self.feature}"
        self.decoder = None

    def initial(self, module) -> torch.Tensor:
        from .unet_split import UNetDecoder

        early = [i for i in module.feature_idx if i < self.feature]
        if early:
            raise ValueError(f"supervising features {early} come before the optimised feature "
                             f"{self.feature} and could not change; use method.feature_idx >= "
                             f"{self.feature}")
        self.decoder = UNetDecoder(module.unet, module.z_t, module.timestep, module.text_embedding,
                                   start=self.feature)
        return self.decoder.bottleneck.detach().clone()

    def forward(self, module, param: torch.Tensor):
        from .features import FeatureTap

        later = [i for i in module.feature_idx if i != self.feature]
        with FeatureTap(module.unet, later) as tap:
            eps = self.decoder(param)
        got = dict(zip(later, tap.features)) if later else {}
        return eps, [param if i == self.feature else got[i] for i in module.feature_idx]

    def latent(self, module, param: torch.Tensor) -> torch.Tensor:
        return module.z_t

    def outcome(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        return module.z_t.clone(), module.result
