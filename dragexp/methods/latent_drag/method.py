"""The latent-optimising drag methods: DragDiffusion, and DragNoise as its parameters.

One pipeline (docs/methods.md, DragDiffusion 1-4):

    LoRA -> encode (posterior mean) -> DDIM inversion to t -> drag optimisation
         -> DDIM denoising (reference-latent control) -> decode -> resize to the source size

Each stage is a function taking tensors so that the conformance adapters call exactly what the
method calls. DragNoise differs only by values and strategies (what is optimised, the mask-term
rule, the tracker's border rule, propagation instead of reference control).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ...callbacks.drag import callback_images, check_before_edit, trajectory_recorder
from ...core.attention import ReferenceControl, attention_control, self_attention_layers
from ...core.inversion import ddim_invert
from ...performance.capture import captured_unet
from ...core.lora import merged_lora
from ...core.sampling import NoisePredictor, ddim_sample
from ...core.schedule import DDIMSchedule
from ...core.stages import StageTimer
from ...drag.points import binarize_mask, clicks_to_grid, resize_mask_nearest, supervision_size
from ...drag.targets import LatentTarget
from ...drag.trackers import BorderError
from ...modules.drag_optimisation import DragObjective, DragOptimisation, fit_drag
from ..base import (EditContext, EditResult, autocast_for, decode_image, edit_result, image_tensor,
                    prompt_of)

if TYPE_CHECKING:
    from ...data.sample import DragSample


# -- stages as functions ---------------------------------------------------------------------

def supervision_points(points_xy, image_hw: tuple[int, int], sup_hw: tuple[int, int]):
    """Clicks -> (handles, targets) float32 (row, col) in the supervision grid."""
    return clicks_to_grid(points_xy, image_hw, sup_hw)


def supervision_mask(mask: torch.Tensor | np.ndarray, sup_hw: tuple[int, int]) -> torch.Tensor:
    """Image-resolution mask (H, W) or (1, 1, H, W) -> binarised (1, 1, *sup_hw), nearest."""
    m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask).float()
    m = m.reshape(1, 1, *m.shape[-2:])
    return resize_mask_nearest(binarize_mask(m), sup_hw)


def invert(unet, latent0: torch.Tensor, text: torch.Tensor, schedule: DDIMSchedule,
           n_actual: int) -> list[torch.Tensor]:
    """DDIM inversion with the prompt, guidance 1 (docs/methods.md, DragDiffusion 2)."""
    return ddim_invert(NoisePredictor(unet, text), latent0, schedule, n_actual)


@dataclass
class DenoiseSettings:
    """How the final denoising runs.

    Args:
        reference_control: DragDiffusion's mutual self-attention on the reference branch.
        start_step, start_layer, total_steps: the control's step and block gating.
        end_step: DragNoise propagation endpoint: the bottleneck replaces the mid-block output
            while the schedule index ``i < num_inference_steps - end_step``.
        propagate: DragNoise's diffusion semantic propagation (paper Sec. 3.2.2). False uses
            the bottleneck at the optimised step only (``i == start_index``), the "forgetting"
            case the paper's propagation fixes.
    """

    reference_control: bool = True
    start_step: int = 0
    start_layer: int = 10
    total_steps: int = 50
    end_step: int = 0
    propagate: bool = True


def denoise(unet, latents: torch.Tensor, text: torch.Tensor, schedule: DDIMSchedule,
            start_index: int, settings: DenoiseSettings, uncond: torch.Tensor | None = None,
            guidance: float = 1.0, bottleneck: torch.Tensor | None = None,
            on_step: Callable | None = None, predictor_hook: Callable | None = None,
            bottleneck_feature: int = 0, gated: bool = False) -> torch.Tensor:
    """Denoise a batch ``[reference, edited, ...]`` from ``timesteps[start_index]`` to 0.

    With reference control on, the edited branch's self-attention in transformer blocks
    ``start_layer..`` reads the reference branch's keys/values (docs/methods.md, DragDiffusion 4).
    With a ``bottleneck``, it replaces the mid-block output at the steps DragNoise propagates
    it. ``gated``: the form a captured UNet traces once for all steps
    (:class:`dragexp.core.sampling.NoisePredictor`).
    """
    n = schedule.num_inference_steps
    predictor = NoisePredictor(unet, text, uncond, guidance, bottleneck,
                               bottleneck_until=lambda i: i < n - settings.end_step and (
                                   settings.propagate or i == start_index),
                               bottleneck_feature=bottleneck_feature, gated=gated)
    eps_fn = predictor if predictor_hook is None else predictor_hook(predictor)
    ctx = nullcontext(None)
    controller = None
    if settings.reference_control:
        controller = ReferenceControl(self_attention_layers(unet, settings.start_layer),
                                      settings.start_step, settings.total_steps,
                                      groups=2 if guidance != 1.0 else 1)
        ctx = attention_control(unet, controller)
    with ctx:
        return ddim_sample(eps_fn, latents, schedule, start_index, controller, on_step)


# -- the method ------------------------------------------------------------------------------

class LatentDragMethod:
    """DragDiffusion (and, by its parameters, DragNoise) on one :class:`DragSample`.

    All arguments are plain values so Hydra can build it from ``configs/method/*.yaml``.

    Args:
        name: method name written with results.
        lora_steps: LoRA fine-tuning steps (0 disables LoRA: the "without LoRA" ablation).
        lora_lr, lora_rank, lora_batch_size: LoRA settings (docs/methods.md, DragDiffusion 1).
        n_inference_step: DDIM schedule length; inversion_strength: fraction inverted.
        feature_idx: UNet features supervising the drag (0 = mid, 1..4 = up_blocks).
        sup_scale: supervision grid as a fraction of the image size (0.5).
        r_m: motion-supervision patch radius (the tracking radius r_p is the tracker's, in
            ``configs/callbacks/<method>.yaml``).
        lam, lr, n_pix_step: mask weight, Adam lr, maximum optimisation steps.
        target: "latent" (DragDiffusion), "bottleneck" (DragNoise: the mid-block output) or
            "feature<k>" (optimise the output of ``up_blocks[k-1]`` instead, an ablation).
        mask_term: "if_masked" (DragDiffusion) or "always" (DragNoise).
        reached: a handle closer than this to its target gets no motion term (2.0 grid cells;
            stopping is the stop callback's, ``callbacks.stop.threshold``).
        denoise: :class:`DenoiseSettings` values.
        prompt_override: use this prompt instead of the sample's (None keeps it).
    """

    def __init__(self, name: str = "dragdiffusion", lora_steps: int = 80, lora_lr: float = 5e-4,
                 lora_rank: int = 16, lora_batch_size: int = 4, n_inference_step: int = 50,
                 inversion_strength: float = 0.7, feature_idx=(3,), sup_scale: float = 0.5,
                 r_m: int = 1, lam: float = 0.1, lr: float = 0.01,
                 n_pix_step: int = 80, target: str = "latent", mask_term: str = "if_masked",
                 reached: float = 2.0, denoise: dict | DenoiseSettings | None = None,
                 prompt_override: str | None = None, seed: int = 0):
        self.name = name
        self.lora = dict(steps=int(lora_steps), lr=float(lora_lr), rank=int(lora_rank),
                         batch_size=int(lora_batch_size))
        self.schedule = DDIMSchedule.sd15(int(n_inference_step))
        self.inversion_strength = float(inversion_strength)
        self.feature_idx = ([int(feature_idx)] if isinstance(feature_idx, (int, str))
                            else [int(i) for i in feature_idx])
        self.sup_scale = float(sup_scale)
        self.r_m = int(r_m)
        self.lam, self.lr, self.n_pix_step = float(lam), float(lr), int(n_pix_step)
        if not (target in ("latent", "bottleneck") or
                (target.startswith("feature") and target[7:].isdigit())):
            raise ValueError(f"method.target must be 'latent', 'bottleneck' or 'feature<k>' "
                             f"(k = 0 mid block, 1..3 up_blocks outputs), got {target!r}")
        self.target_name = target
        self.objective = DragObjective(self.r_m, self.lam, mask_term, reached)
        d = denoise or {}
        self.denoise_settings = d if isinstance(d, DenoiseSettings) else DenoiseSettings(**dict(d))
        self.prompt_override = prompt_override
        self.seed = int(seed)

    # The strategy for what is optimised; DragNoise's lives in dragexp.drag.targets too.
    def make_target(self):
        if self.target_name == "latent":
            return LatentTarget()
        from .bottleneck import BottleneckTarget
        k = 0 if self.target_name == "bottleneck" else int(self.target_name[7:])
        return BottleneckTarget(k)

    def edit_steps(self) -> int:
        """DDIM steps inverted and denoised: ``round(n_inference_step * inversion_strength)``."""
        return self.schedule.num_edit_steps(self.inversion_strength)

    def edit(self, sample: DragSample, models, ctx: EditContext) -> EditResult:
        """Edit one sample: LoRA, inversion, drag, denoising.

        docs/methods.md, DragDiffusion 1-4.
        """
        speed, callbacks = ctx.speed, list(ctx.callbacks)
        timer = StageTimer()
        H, W = sample.image.shape[:2]
        prompt = prompt_of(sample, self.prompt_override)
        sup_hw = supervision_size((H, W), self.sup_scale)
        try:
            handles, targets = supervision_points(sample.points, (H, W), sup_hw)
        except ValueError as exc:
            from ...data.sample import SampleError
            raise SampleError(f"sample {sample.name!r}: points: {exc}") from exc
        # e.g. no auto mask on a bottleneck, no reference tracking from the top/left border
        check_before_edit(callbacks, self.make_target(), handles, sample)
        mask_sup = supervision_mask(sample.mask, sup_hw)

        text = models.encode_prompt(prompt)
        lora_path = None
        try:
            with timer("lora"):
                if self.lora["steps"] > 0:
                    lora_path = self._lora(sample, prompt, models, text, ctx)
            merged = merged_lora(models.unet) if speed.merge_lora else nullcontext()
            with merged:
                module, out = self._drag_and_denoise(sample, models, callbacks, text, handles,
                                                     targets, mask_sup, ctx, timer)
            with timer("decode"):
                result = decode_image(models, out[-1:], (H, W))
        finally:   # the next sample starts from the base weights, whatever happened here
            if self.lora["steps"] > 0:
                _disable_lora(models.unet)

        recorder = trajectory_recorder(callbacks)
        return edit_result(result, handles, targets, sup_hw, recorder, module, timer,
                           lora_path=lora_path,
                           extras={"images": callback_images(callbacks, (H, W))})

    def _drag_and_denoise(self, sample, models, callbacks, text, handles, targets, mask_sup,
                          ctx: EditContext, timer):
        """Encode, invert, optimise and denoise: (drag module, latents).

        docs/methods.md, DragDiffusion 2-4.
        """
        device, speed = models.device, ctx.speed
        autocast = autocast_for(ctx.precision, device)
        image = image_tensor(sample.image)
        with timer("encode"), torch.no_grad():
            latent0 = models.encode_image(image.to(device, models.vae.dtype)).float()
        n_actual = self.edit_steps()
        start = self.schedule.edit_index(n_actual)
        t = self.schedule.timesteps[start]
        capture = speed.step_capture(device)
        with timer("inversion"), autocast, captured_unet(models.unet, capture):
            z_t = invert(models.unet, latent0, text, self.schedule, n_actual)[-1].float()

        module = DragOptimisation(models.unet, self.make_target(), z_t, t, text,
                                  handles, targets, mask_sup, self.schedule, self.feature_idx,
                                  self.objective, self.lr, self.n_pix_step,
                                  reuse_initial_forward=speed.reuse_initial_forward,
                                  fused_optimizer=speed.fused_optimizer,
                                  capture=capture)
        with timer("optimisation"):
            try:
                fit_drag(module, callbacks, precision=ctx.precision, progress=ctx.progress)
            except BorderError as exc:
                raise BorderError(f"sample {sample.name!r}: {exc}") from exc
        edited, bottleneck = module.outcome()
        # Without reference control the reference branch [0] never reaches the edited one [1];
        # the fast path drops it (the authors' code denoises both).
        batch = edited if speed.single_branch and not self.denoise_settings.reference_control \
            else torch.cat([z_t, edited])
        with timer("denoising"), autocast, captured_unet(models.unet, capture):
            out = denoise(models.unet, batch, text, self.schedule, start,
                          self.denoise_settings, bottleneck=bottleneck,
                          bottleneck_feature=getattr(module.target, "feature", 0),
                          gated=capture is not None)
        return module, out

    def _lora(self, sample, prompt, models, text, ctx: EditContext):
        from ...core.lora import lora_cache_key
        from ...modules.lora_finetune import train_lora

        if ctx.lora_dir is None:
            raise ValueError(f"{self.name}: method.lora_steps={self.lora['steps']} needs a LoRA "
                             "folder (EditContext.lora_dir; paths.lora_cache in the configs)")
        precision, speed = ctx.precision, ctx.speed
        settings = dict(self.lora, resolution=int(models.resolution), seed=self.seed)
        prefetch, fused = speed.lora_prefetch, speed.fused_optimizer
        if precision not in ("32", "32-true") or prefetch:   # keys of fp32 runs stay as they were
            settings.update(precision=precision, prefetch=bool(prefetch))
        if fused:
            settings.update(fused_optimizer=True)
        capture = speed.step_capture(models.device)
        if capture is not None:
            settings.update(capture=capture.backend)
        key = lora_cache_key(sample.image, prompt, models.source, settings)
        return train_lora(models.unet, models.vae, text, sample.image, out_dir=ctx.lora_dir,
                          cache_key=key, progress=ctx.progress, callbacks=list(ctx.lora_callbacks),
                          trainer_kwargs=dict(precision=precision),
                          scaling_factor=models.scaling_factor, rank=self.lora["rank"],
                          lr=self.lora["lr"], steps=self.lora["steps"],
                          batch_size=self.lora["batch_size"], resolution=int(models.resolution),
                          seed=self.seed, prefetch=prefetch, fused_optimizer=fused,
                          capture=capture)


def _disable_lora(unet) -> None:
    """Remove this sample's adapter so the next sample starts from the base weights."""
    if getattr(unet, "peft_config", None):
        unet.delete_adapters(list(unet.peft_config.keys()))
