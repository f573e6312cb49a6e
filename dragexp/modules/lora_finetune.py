"""DragDiffusion's identity-preserving LoRA fine-tuning as a LightningModule.

docs/methods.md, DragDiffusion 1 (the reference's ``utils/lora_utils.py::train_lora``). One
step, in this order:

1. ``batch_size`` augmented views of the image (:func:`dragexp.core.augment.lora_views`), float16;
2. ``x0 = vae.encode(views).latent_dist`` *sampled* (a fresh posterior sample every step)
   ``* scaling_factor``;
3. ``noise ~ N(0, I)``, ``t ~ U{0, ..., 999}`` per view;
4. ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`` (DDPM ``add_noise``, SD 1.5's ``scaled_linear``
   alpha-bar);
5. ``loss = mse(unet(x_t, t, prompt embedding).sample, noise)`` (epsilon target);
6. backward and one AdamW step (betas 0.9/0.999, eps 1e-8, decoupled weight decay, constant lr)
   over the LoRA weights only.

Every random draw goes through a :class:`Draws` strategy: :class:`RandomDraws` for real runs,
:class:`ReplayDraws` to feed recorded draws (the conformance cases inject all of them).

The base UNet may be float16/bfloat16 on a GPU with Lightning's ``"16-mixed"``/``"bf16-mixed"``
precision (autocast, and for fp16 a dynamic loss scaler that skips overflowing steps, as the
reference's accelerate setup does); the LoRA weights are float32 throughout. On CPU everything is
float32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..core.augment import crop_offsets, lora_views, resize_shorter, to_model_range
from ..core.lora import (LORA_WEIGHT_NAME, add_lora, has_lora, load_lora, lora_parameters,
                         lora_state_dict, save_lora)
from ..core.schedule import sd_alphas_cumprod
from ..performance.capture import StepCapture, optimizer_step, outlives_replay
from .fitting import fit

__all__ = ["Draws", "RandomDraws", "ReplayDraws", "LoRAFineTune", "ddpm_add_noise",
           "default_precision", "fit_lora", "train_lora"]


# --------------------------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------------------------

class Draws:
    """Where a LoRA step's random numbers come from.

    ``crop(high)`` gives one crop offset in ``[0, high)``; ``posterior(dist)`` one sample of the
    VAE posterior (before the scaling factor); ``noise(shape)`` standard normal noise;
    ``timesteps(batch)`` one training timestep per view (int64).
    """

    num_train_timesteps: int = 1000

    def crop(self, high: int) -> int:
        raise NotImplementedError

    def posterior(self, dist: Any) -> torch.Tensor:
        raise NotImplementedError

    def noise(self, shape: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def timesteps(self, batch: int) -> torch.Tensor:
        raise NotImplementedError


class RandomDraws(Draws):
    """Draws from one seeded CPU ``torch.Generator`` (device-independent, reproducible)."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(int(seed))

    def crop(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self.generator).item())

    def posterior(self, dist: Any) -> torch.Tensor:
        return dist.sample(generator=self.generator)

    def noise(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator)

    def timesteps(self, batch: int) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=self.generator)


class ReplayDraws(Draws):
    """Replays recorded draws, in order; a kind that was not given falls back to ``fallback``.

    Args:
        crops: flat sequence of crop offsets in call order (top, left, top, left, ...).
        posterior_samples: ``[steps, B, C, h, w]`` posterior samples, one row per step.
        noise: ``[steps, B, C, h, w]``.
        timesteps: ``[steps, B]`` int64.
        fallback: used for kinds without a recording (default: raise).

    ``crop_highs`` records the upper bound of every crop draw, in call order.
    """

    def __init__(self, crops: Iterable[int] | None = None,
                 posterior_samples: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                 fallback: Draws | None = None):
        self.crops = None if crops is None else [int(c) for c in crops]
        self.posterior_samples = posterior_samples
        self.noise_samples = noise
        self.timestep_samples = timesteps
        self.fallback = fallback
        self.counts = {"crop": 0, "posterior": 0, "noise": 0, "timesteps": 0}
        self.crop_highs: list[int] = []

    def _next(self, kind: str, recorded):
        i = self.counts[kind]
        if i >= len(recorded):
            raise IndexError(f"ReplayDraws: no recorded {kind} draw left (used {i})")
        self.counts[kind] = i + 1
        return recorded[i]

    def _missing(self, kind: str) -> Draws:
        if self.fallback is None:
            raise RuntimeError(f"ReplayDraws: a {kind} draw was requested but none was recorded")
        return self.fallback

    def crop(self, high: int) -> int:
        self.crop_highs.append(int(high))
        if self.crops is None:
            return self._missing("crop").crop(high)
        value = self._next("crop", self.crops)
        if not 0 <= value < high:
            raise ValueError(f"ReplayDraws: recorded crop offset {value} outside [0, {high})")
        return value

    def posterior(self, dist: Any) -> torch.Tensor:
        if self.posterior_samples is None:
            return self._missing("posterior").posterior(dist)
        return self._next("posterior", self.posterior_samples)

    def noise(self, shape: Sequence[int]) -> torch.Tensor:
        if self.noise_samples is None:
            return self._missing("noise").noise(shape)
        out = self._next("noise", self.noise_samples)
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"ReplayDraws: recorded noise {tuple(out.shape)} != {tuple(shape)}")
        return out

    def timesteps(self, batch: int) -> torch.Tensor:
        if self.timestep_samples is None:
            return self._missing("timesteps").timesteps(batch)
        out = self._next("timesteps", self.timestep_samples)
        if out.numel() != batch:
            raise ValueError(f"ReplayDraws: recorded {out.numel()} timesteps, batch is {batch}")
        return out.long()


# --------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------

def ddpm_add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """Forward diffusion ``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` (DDPM, Ho et al. 2020, eq. 4).

    Same operations as diffusers' ``DDPMScheduler.add_noise`` (alpha-bar cast to the sample's
    dtype, then square roots), so results are bit-identical to it.
    """
    ac = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    t = t.to(x0.device)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    sqrt_a = (ac[t] ** 0.5).flatten().reshape(shape)
    sqrt_1ma = ((1 - ac[t]) ** 0.5).flatten().reshape(shape)
    return sqrt_a * x0 + sqrt_1ma * noise


def _module_dtype(module: nn.Module) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for p in module.parameters():
        return p.dtype
    return torch.float32


# --------------------------------------------------------------------------------------------
# The LightningModule
# --------------------------------------------------------------------------------------------

class LoRAFineTune(L.LightningModule):
    """Fine-tunes a LoRA on the UNet so that it reconstructs one image (DragDiffusion step 1).

    The UNet gets a LoRA adapter (:func:`dragexp.core.lora.add_lora`) unless it already has one (e.g.
    with an injected initial state). Only the LoRA weights are optimised, with manual
    optimisation so that each step runs exactly: zero_grad, views, VAE posterior sample, noise,
    timesteps, ``add_noise``, UNet, MSE, backward, AdamW step.

    After every step ``last_step`` holds (detached) ``loss``, ``noisy_model_input``,
    ``unet_timesteps`` and ``model_pred``; ``lora/loss`` is logged. When training ends,
    ``final_lora_state`` holds the LoRA weights (peft naming, detached copies).

    Args:
        unet: diffusers ``UNet2DConditionModel`` (any dtype; the LoRA is float32).
        vae: anything with ``encode(x).latent_dist`` (diffusers ``AutoencoderKL``).
        text_embedding: ``(1, 77, D)`` prompt embedding, computed once without gradient.
        image: uint8 ``(H, W, 3)`` RGB image.
        scaling_factor: VAE latent scale (0.18215 for SD 1.5).
        rank: LoRA rank, used only if the UNet has no adapter yet.
        lr: AdamW learning rate (constant).
        weight_decay: AdamW decoupled weight decay.
        steps: number of training steps.
        batch_size: views per step.
        resolution: resize/crop size of the views (the model's resolution).
        draws: source of random numbers; default :class:`RandomDraws` with seed 0.
        prefetch: the fast path (``speed.lora_prefetch``, :class:`RandomDraws` only): every
            step's draws are made up front in the order the steps would make them (so the
            values are the same), each distinct augmented view is encoded once (a view is a
            crop of the one resized image; its posterior mean and std do not change), and no
            per-step loss is logged: a step then makes no host round trip.
        fused_optimizer: AdamW as one fused kernel (``speed.fused_optimizer``); the same
            update up to rounding.
        capture: run each step as compiled graphs (``speed=graphs``,
            :mod:`dragexp.performance.capture`): noising, UNet and MSE as one graph with its
            backward, the AdamW update as another.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, text_embedding: torch.Tensor,
                 image: np.ndarray, scaling_factor: float = 0.18215, rank: int = 16,
                 lr: float = 5e-4, weight_decay: float = 1e-2, steps: int = 80,
                 batch_size: int = 4, resolution: int = 512, draws: Draws | None = None,
                 prefetch: bool = False, fused_optimizer: bool = False,
                 capture: StepCapture | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.unet = unet
        self.vae = vae
        if not has_lora(unet):
            add_lora(unet, rank=rank)
        self.register_buffer("text_embedding", text_embedding.detach().clone(), persistent=False)
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod(), persistent=False)
        self.image = np.ascontiguousarray(image)
        self.scaling_factor = float(scaling_factor)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.steps = int(steps)
        self.batch_size = int(batch_size)
        self.resolution = int(resolution)
        self.draws = draws if draws is not None else RandomDraws(0)
        self.last_step: dict[str, torch.Tensor] = {}
        self.final_lora_state: dict[str, torch.Tensor] | None = None
        self.prefetch = bool(prefetch)
        self.fused_optimizer = bool(fused_optimizer)
        if self.prefetch and type(self.draws) is not RandomDraws:
            raise ValueError("LoRA prefetch replays RandomDraws' sequence; "
                             f"got {type(self.draws).__name__}")
        self._fetched: dict[str, torch.Tensor] = {}
        self.capture = capture
        self._captured_loss = None

    # data --------------------------------------------------------------------------------
    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(self.steps), batch_size=None)

    # optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        params = lora_parameters(self.unet)
        for p in params:
            if p.dtype != torch.float32:
                raise TypeError(f"LoRA weights must be float32, got {p.dtype}")
        kwargs = self.capture.optimizer_kwargs() if self.capture is not None else \
            dict(fused=self.fused_optimizer or None)
        return torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=self.weight_decay, **kwargs)

    def encode_views(self) -> torch.Tensor:
        """One step's model input: posterior sample of the augmented views times the scale."""
        views = lora_views(self.image, self.batch_size, self.resolution, randint=self.draws.crop)
        with torch.no_grad():
            dist = self.vae.encode(views.to(self.device, _module_dtype(self.vae))).latent_dist
            sample = self.draws.posterior(dist)
        return sample.to(self.device, torch.float32) * self.scaling_factor

    def on_train_start(self) -> None:
        if self.prefetch:
            self._fetched = self._prefetch()

    def _prefetch(self) -> dict[str, torch.Tensor]:
        """All steps' draws (crop, posterior, noise, timesteps per step, as a step draws them)
        and the posterior moments of each distinct view, on the device."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        resized = np.asarray(resize_shorter(Image.fromarray(self.image), self.resolution))
        h, w = resized.shape[:2]
        size, vae_dtype = self.resolution, _module_dtype(self.vae)
        latent_hw = (size // 8, size // 8)
        # A posterior with mean 0 and std 1 on the CPU: its sample is the draw itself.
        unit = DiagonalGaussianDistribution(
            torch.zeros(self.batch_size, 8, *latent_hw, dtype=vae_dtype))
        views: dict[tuple[int, int], int] = {}
        index, eps, noise, steps_t = [], [], [], []
        for _ in range(self.steps):
            offsets = [crop_offsets(h, w, size, self.draws.crop) for _ in range(self.batch_size)]
            index.append([views.setdefault(o, len(views)) for o in offsets])
            eps.append(self.draws.posterior(unit))
            noise.append(self.draws.noise((self.batch_size, 4, *latent_hw)))
            steps_t.append(self.draws.timesteps(self.batch_size))
        pixels = torch.stack([to_model_range(resized[t:t + size, l:l + size])
                              for t, l in views]).to(torch.float16)
        means, stds = [], []
        with torch.no_grad():
            for chunk in pixels.split(8):
                dist = self.vae.encode(chunk.to(self.device, vae_dtype)).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        dev = self.device
        return dict(index=torch.tensor(index, device=dev), mean=torch.cat(means),
                    std=torch.cat(stds), eps=torch.stack(eps).to(dev),
                    noise=torch.stack(noise).to(dev),
                    timesteps=torch.stack(steps_t).to(dev, torch.long))

    def _prefetched_inputs(self, step: int):
        f = self._fetched
        idx = f["index"][step]
        sample = f["mean"][idx] + f["std"][idx] * f["eps"][step]
        model_input = sample.to(torch.float32) * self.scaling_factor
        return model_input, f["noise"][step].to(model_input), f["timesteps"][step]

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        if self.prefetch:
            model_input, noise, t = self._prefetched_inputs(int(batch))
        else:
            model_input = self.encode_views()
            noise = self.draws.noise(model_input.shape).to(model_input)
            t = self.draws.timesteps(model_input.shape[0]).to(self.device, torch.long)
        if self.capture is not None and self._captured_loss is None:
            self._captured_loss = self.capture.compile(self.denoising_loss)
        loss, noisy, pred = (self._captured_loss or self.denoising_loss)(model_input, noise, t)
        self.manual_backward(loss)
        optimizer_step(opt, self.capture)
        if self.capture is not None:
            noisy, pred = outlives_replay(noisy, self.capture), outlives_replay(pred, self.capture)
        self.last_step = {"loss": loss.detach(), "noisy_model_input": noisy.detach(),
                          "unet_timesteps": t.detach(), "model_pred": pred.detach()}
        if not self.prefetch:   # the progress bar reads the value back: a host sync per step
            self.log("lora/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False,
                     batch_size=model_input.shape[0])
        return loss.detach()

    def denoising_loss(self, model_input: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(MSE(eps_theta(x_t, t), noise), x_t, eps_theta) for x_t = add_noise(x_0, noise, t):
        the LoRA objective (DragDiffusion step 1), the graph a captured step compiles."""
        noisy = ddpm_add_noise(self.alphas_cumprod, model_input, noise, t)
        dtype = _module_dtype(self.unet)
        emb = self.text_embedding.to(dtype).repeat(model_input.shape[0], 1, 1)
        pred = self.unet(noisy.to(dtype), t, encoder_hidden_states=emb).sample
        return F.mse_loss(pred.float(), noise.float(), reduction="mean"), noisy, pred

    def on_train_end(self) -> None:
        self._captured_loss = None
        self.final_lora_state = self.lora_weights()

    def lora_weights(self) -> dict[str, torch.Tensor]:
        """The current LoRA weights, peft naming, detached copies."""
        return {k: v.detach().clone() for k, v in lora_state_dict(self.unet).items()}


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------

def default_precision(unet: nn.Module) -> str:
    """Lightning precision for a UNet of this dtype: mixed for half base weights, else fp32."""
    dtype = _module_dtype(unet)
    if dtype == torch.float16:
        return "16-mixed"
    if dtype == torch.bfloat16:
        return "bf16-mixed"
    return "32-true"


def fit_lora(module: LoRAFineTune, *, callbacks: Sequence[L.Callback] = (), progress: bool = True,
             trainer_kwargs: dict | None = None) -> L.Trainer:
    """Fit ``module`` with a fresh Trainer; the UNet/VAE keep their device and train/eval mode.

    Lightning moves the module to its device for the fit and to the CPU at teardown; both are
    undone here so that a shared model bundle stays where it was.
    """
    kwargs = dict(precision=default_precision(module.unet))
    kwargs.update(trainer_kwargs or {})
    return fit(module, max_steps=module.steps, callbacks=callbacks, progress=progress,
               keep=(module.unet, module.vae), **kwargs)


def train_lora(unet: nn.Module, vae: nn.Module, text_embedding: torch.Tensor, image: np.ndarray,
               *, out_dir: str | os.PathLike, cache_key: str | None = None,
               trainer_kwargs: dict | None = None, progress: bool = True, seed: int = 0,
               callbacks: Sequence[L.Callback] = (), **hparams) -> Path:
    """Train (or reuse) the identity-preserving LoRA for one image; the UNet keeps it active.

    With a ``cache_key`` (see :func:`dragexp.core.lora.lora_cache_key`), a file
    ``out_dir/<cache_key>/pytorch_lora_weights.safetensors`` from an earlier run with the same
    image, prompt, model and settings is loaded instead of training. Otherwise a fresh adapter is
    added (initialised from ``seed``), fitted by a fresh Trainer, and saved atomically there
    (directly in ``out_dir`` without a key).

    Args:
        unet, vae, text_embedding, image: as in :class:`LoRAFineTune`.
        out_dir: where LoRA files are kept.
        cache_key: name of the LoRA's folder; enables reuse.
        trainer_kwargs: extra/overriding ``lightning.Trainer`` arguments (e.g. ``precision``).
        progress: show Lightning's progress bar.
        seed: seeds the LoRA init and the default :class:`RandomDraws`.
        callbacks: extra Lightning callbacks.
        **hparams: :class:`LoRAFineTune` hyper-parameters (``rank``, ``lr``, ``weight_decay``,
            ``steps``, ``batch_size``, ``resolution``, ``scaling_factor``, ``draws``).

    Returns:
        Path of the LoRA file.
    """
    folder = Path(out_dir) / cache_key if cache_key else Path(out_dir)
    path = folder / LORA_WEIGHT_NAME
    if cache_key and path.is_file():
        load_lora(unet, path)
        unet.requires_grad_(False)
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_lora(unet, rank=hparams.pop("rank", 16))
    hparams.setdefault("draws", RandomDraws(seed))
    module = LoRAFineTune(unet, vae, text_embedding, image, **hparams)
    fit_lora(module, callbacks=callbacks, progress=progress, trainer_kwargs=trainer_kwargs)
    unet.requires_grad_(False)
    return save_lora(unet, folder)
