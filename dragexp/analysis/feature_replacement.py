"""DragNoise's diffusion-semantics analysis: DDIM reconstruction with one layer frozen.

"Drag Your Noise" (Liu et al., CVPR 2024), Sec. 1 "Diffusion Semantic Analysis", Figs. 2 and
3: a real image is DDIM-inverted, then reconstructed by DDIM denoising in which, from a chosen
denoising timestep on, the output of one UNet layer is *copied* from that timestep into every
later UNet call. How far the reconstruction drifts from the input (MSE, LPIPS) says how much of
the image that layer's feature at that timestep already carries. The paper's finding: the
bottleneck (mid-block output) copied from timestep 35 still reconstructs the image, low-level
encoder features do not, which motivates optimising and propagating the bottleneck.

This is an analysis, not an edit: :class:`FeatureReplacementProbe` has the methods' ``edit``
interface so that ``scripts/train.py`` runs it over any data source and sweeps it
(``experiment=paper/dragnoise_bottleneck_replacement``); its "edited image" is the
reconstruction and its result carries ``metrics`` (``recon_mse``, ``recon_lpips``). No LoRA, no
guidance (the paper uses pre-trained Stable Diffusion; real images are inverted and denoised
with guidance 1 as in DragNoise).

Timesteps follow DragNoise's counting: "timestep k" is the latent after k of the 50 inversion
steps, i.e. schedule index ``50 - k`` of the denoising (35 -> index 15, t = 681).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..core.inversion import ddim_invert
from ..core.sampling import NoisePredictor, ddim_sample
from ..core.schedule import DDIMSchedule
from ..core.stages import StageTimer
from ..methods.base import (EditContext, EditResult, decode_image, fixed_points_result,
                            image_tensor, prompt_of)

__all__ = ["layer_names", "layer_module", "FrozenLayer", "reconstruct", "FeatureReplacementProbe"]


def layer_names(unet: nn.Module) -> list[str]:
    """``none`` (plain reconstruction), ``down0..``, ``mid``, ``up0..``: the UNet's blocks.

    ``down<k>`` is ``down_blocks[k]`` (the paper's "Encoder Block k+1"; its output includes the
    skip connections it hands to the decoder), ``mid`` the bottleneck, ``up<k>`` ``up_blocks[k]``.
    """
    return (["none"] + [f"down{k}" for k in range(len(unet.down_blocks))] + ["mid"]
            + [f"up{k}" for k in range(len(unet.up_blocks))])


def layer_module(unet: nn.Module, name: str) -> nn.Module | None:
    """The module named by :func:`layer_names` (None for ``none``)."""
    names = layer_names(unet)
    if name not in names:
        raise ValueError(f"method.layer must be one of {names}, got {name!r}")
    if name == "none":
        return None
    if name == "mid":
        return unet.mid_block
    blocks = unet.down_blocks if name.startswith("down") else unet.up_blocks
    return blocks[int(name[len("down") if name.startswith("down") else len("up"):])]


def _detached(out):
    if torch.is_tensor(out):
        return out.detach().clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_detached(o) for o in out)
    return out


class FrozenLayer:
    """A forward hook that records ``module``'s output at schedule index ``copy_index`` and
    returns that recorded output (tuple outputs included) at every later index.

    The sampler tells it the current index through :meth:`eps_fn`, which wraps a noise
    predictor ``eps(x, t, i)``.
    """

    def __init__(self, module: nn.Module, copy_index: int):
        self.module = module
        self.copy_index = int(copy_index)
        self.index = -1
        self.stored = None

    def _hook(self, _module, _inputs, output):
        if self.index == self.copy_index:
            self.stored = _detached(output)
        elif self.index > self.copy_index:
            if self.stored is None:
                raise RuntimeError(f"no feature was recorded at schedule index {self.copy_index} "
                                   "(the denoising started after it)")
            return self.stored
        return None

    def eps_fn(self, predictor):
        def eps(x, t, i):
            self.index = int(i)
            return predictor(x, t, i)
        return eps

    @contextmanager
    def active(self) -> Iterator["FrozenLayer"]:
        handle = self.module.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            self.stored = None


@torch.no_grad()
def reconstruct(unet: nn.Module, latent0: torch.Tensor, text: torch.Tensor,
                schedule: DDIMSchedule, inversion_steps: int, module: nn.Module | None,
                copy_index: int) -> torch.Tensor:
    """Invert ``latent0`` for ``inversion_steps`` steps and denoise it back to t = 0, with the
    output of ``module`` frozen from schedule index ``copy_index`` on (None: plain DDIM)."""
    predictor = NoisePredictor(unet, text)
    inv = ddim_invert(predictor, latent0, schedule, inversion_steps)
    start = schedule.edit_index(inversion_steps)
    if module is None:
        return ddim_sample(predictor, inv[-1], schedule, start)
    if copy_index < start:
        raise ValueError(f"the copy step (schedule index {copy_index}) comes before the "
                         f"denoising starts (index {start}): invert at least "
                         f"{schedule.num_inference_steps - copy_index} steps")
    frozen = FrozenLayer(module, copy_index)
    with frozen.active():
        return ddim_sample(frozen.eps_fn(predictor), inv[-1], schedule, start)


class FeatureReplacementProbe:
    """DragNoise's Fig. 2 / Fig. 3 analysis on one sample, with the methods' ``edit`` interface.

    Args:
        name: written with the results.
        layer: see :func:`layer_names` (``none`` is the reconstruction without copying).
        copy_from_step: DragNoise's timestep (inversion steps done) from which the layer's
            output is copied into every later step; 35 in Fig. 3.
        n_inference_step: DDIM schedule length (50).
        inversion_steps: how many steps are inverted before denoising back (50: from z_T, so
            every copy step of Fig. 2 is reachable).
        lpips: an LPIPS network (``${eval.lpips}``, built by the config) for ``recon_lpips``;
            None skips it.
        prompt_override: use this prompt instead of the sample's.
    """

    def __init__(self, name: str = "feature_replacement", layer: str = "mid",
                 copy_from_step: int = 35, n_inference_step: int = 50, inversion_steps: int = 50,
                 lpips: nn.Module | None = None, prompt_override: str | None = None,
                 seed: int = 0):
        self.name = name
        self.layer = str(layer)
        self.schedule = DDIMSchedule.sd15(int(n_inference_step))
        self.copy_index = self.schedule.edit_index(int(copy_from_step))
        self.inversion_steps = int(inversion_steps)
        self.schedule.edit_index(self.inversion_steps)     # checks the range
        if self.copy_index < self.schedule.edit_index(self.inversion_steps):
            raise ValueError(f"method.copy_from_step={copy_from_step} exceeds "
                             f"method.inversion_steps={inversion_steps}")
        self.lpips = lpips
        self.prompt_override = prompt_override
        self.seed = int(seed)

    def edit_steps(self) -> int:
        """DDIM steps inverted and denoised (``inversion_steps``)."""
        return self.inversion_steps

    def edit(self, sample, models, ctx: EditContext | None = None) -> EditResult:
        """Reconstruct ``sample.image`` with :attr:`layer` frozen; nothing in ``ctx`` applies
        (no optimisation, no LoRA)."""
        from ..evaluation.lpips_if import lpips_distance

        timer = StageTimer()
        module = layer_module(models.unet, self.layer)
        H, W = sample.image.shape[:2]
        text = models.encode_prompt(prompt_of(sample, self.prompt_override))
        image = image_tensor(sample.image)
        with timer("encode"), torch.no_grad():
            latent0 = models.encode_image(image.to(models.device, models.vae.dtype)).float()
        with timer("reconstruction"):
            out = reconstruct(models.unet, latent0, text, self.schedule, self.inversion_steps,
                              module, self.copy_index)
        with timer("decode"):
            result = decode_image(models, out, (H, W))
        mse = float(np.mean((result.astype(np.float64) / 255.0
                             - sample.image.astype(np.float64) / 255.0) ** 2))
        lp = float(lpips_distance(self.lpips, sample.image, result)) if self.lpips is not None \
            else float("nan")
        return fixed_points_result(
            sample, result, timer.seconds,
            extras=dict(metrics=dict(recon_mse=mse, recon_lpips=lp), layer=self.layer,
                        copy_index=self.copy_index))
