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
    """Optimise the UNet's mid-block output for the fixed z_t (DragNoise).

    The encoder pass runs once (:class:`dragexp.unet_split.UNetDecoder`); every optimisation
    step runs only the decoder. Feature index 0 (the mid-block output) is the bottleneck itself.
    The latent is returned unchanged and the optimised bottleneck is propagated in denoising.
    """

    name = "bottleneck"

    def __init__(self):
        self.decoder = None

    def initial(self, module) -> torch.Tensor:
        from .unet_split import UNetDecoder

        self.decoder = UNetDecoder(module.unet, module.z_t, module.timestep, module.text_embedding)
        return self.decoder.bottleneck.detach().clone()

    def forward(self, module, param: torch.Tensor):
        from .features import FeatureTap

        up = [i for i in module.feature_idx if i != 0]
        with FeatureTap(module.unet, up) as tap:
            eps = self.decoder(param)
        got = dict(zip(up, tap.features)) if up else {}
        return eps, [param if i == 0 else got[i] for i in module.feature_idx]

    def latent(self, module, param: torch.Tensor) -> torch.Tensor:
        return module.z_t

    def outcome(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        return module.z_t.clone(), module.result
