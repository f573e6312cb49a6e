"""How well a model gives an image back: DDIM inversion, then denoising, with no edit between.

The floor under every drag edit: an edit cannot be closer to its source outside the mask than
the method's own reconstruction is. Measured at DragDiffusion's settings (50 DDIM steps,
inversion strength 0.7 = 35 steps, guidance 1, the sample's prompt), without LoRA and without
reference control, so it measures the model, not a method's help.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.inversion import ddim_invert
from ..core.sampling import NoisePredictor, ddim_sample
from ..core.schedule import DDIMSchedule
from ..data.sample import DragSample

__all__ = ["reconstruct", "reconstruction_psnr"]


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x[0].permute(1, 2, 0).float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().numpy()


@torch.no_grad()
def reconstruct(models, sample: DragSample, n_inference_step: int = 50,
                inversion_strength: float = 0.7) -> np.ndarray:
    """``decode(denoise(invert(encode(image))))`` of one sample, ``uint8 (H, W, 3)``."""
    schedule = DDIMSchedule.sd15(n_inference_step)
    n = schedule.num_edit_steps(inversion_strength)
    eps = NoisePredictor(models.unet, models.encode_prompt(sample.prompt))
    z0 = models.encode_image(_to_tensor(sample.image))
    zt = ddim_invert(eps, z0, schedule, n)[-1]
    z = ddim_sample(eps, zt, schedule, schedule.edit_index(n))
    return _to_uint8(models.decode(z))


def reconstruction_psnr(models, samples, **settings) -> list[float]:
    """PSNR (dB) of :func:`reconstruct` against each sample's source image."""
    out = []
    for s in samples:
        rec = reconstruct(models, s, **settings).astype(np.float64)
        mse = float(np.mean((rec - s.image.astype(np.float64)) ** 2))
        out.append(math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse))
    return out
