"""EasyDrag (Hou et al., CVPR 2024) on the shared parts, as the authors' code runs it.

Pipeline (docs/methods.md, EasyDrag 1-17):

    resize to the working size -> encode (VAE posterior *sampled*) -> DDIM inversion, all 50
    steps, every latent kept -> drag optimisation of z_t at t = 681 (the shared
    :class:`~dragexp.modules.drag_optimisation.DragOptimisation` with EasyDrag's strategies)
    -> 35-step denoising with reference guidance -> decode -> resize to the source size

What EasyDrag changes in the shared loop is strategies and values only:

* target :class:`~dragexp.drag.targets.ReferenceLatentTarget` (batch ``[z_t, frozen z_t]`` with
  reference attention in the decoder self-attention; F0 at batch 1 without it);
* features ``feature_idx = [2, 3]`` (``up_blocks[1]`` and ``up_blocks[2]`` outputs) composed by
  :func:`~dragexp.core.features.concat_then_resize` to image resolution, so points are image pixels;
* loss :class:`~dragexp.modules.drag_optimisation.CosineDragObjective`;
* callbacks (``configs/callbacks/easydrag.yaml``): :class:`~dragexp.drag.trackers.NextPointTracker`
  tracking from step 0, the stop rule at < 1 px, :class:`~dragexp.callbacks.AutoMask`.

Each stage is a function so that the conformance adapters call what the method calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ...callbacks.drag import callback_images, check_before_edit, trajectory_recorder
from ...core.features import concat_then_resize
from ...core.inversion import ddim_invert
from ...core.sampling import NoisePredictor, ReferenceAttentionUNet, ReferenceGuidance, ddim_sample
from ...core.schedule import DDIMSchedule
from ...core.stages import StageTimer
from ...performance.capture import captured_unet
from ...drag.points import binarize_mask, clicks_to_grid
from ...modules.drag_optimisation import CosineDragObjective, DragOptimisation, fit_drag
from ..base import (EditContext, EditResult, autocast_for, decode_image, edit_result, image_tensor,
                    prompt_of, resize_image, working_size)
from .reference import ReferenceLatentTarget

if TYPE_CHECKING:
    from ...data.sample import DragSample

DEFAULT_A_PROMPT = "best quality, extremely detailed"
DEFAULT_N_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, "
                    "fewer digits, cropped, worst quality, low quality")


# -- stages as functions ---------------------------------------------------------------------

def drag_points(points_xy, image_hw: tuple[int, int], work_hw: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clicks (x, y) on the source -> handles, targets (row, col) in working-image pixels.

    EasyDrag supervises at image resolution (``feat_scale`` 8 on the latent), so the (row, col)
    are round(y / H * h, x / W * w) of the working image of size (h, w). A click on the last
    row/column of the source can round to h or w; it is clamped onto the image (the authors'
    indexing would fail there).
    """
    handles, targets = clicks_to_grid(points_xy, image_hw, work_hw)
    hi = torch.tensor([work_hw[0] - 1, work_hw[1] - 1], dtype=torch.float32)
    return torch.minimum(handles.clamp(min=0), hi), torch.minimum(targets.clamp(min=0), hi)


def user_mask(mask, work_hw: tuple[int, int]) -> torch.Tensor:
    """The drawn mask (H, W), nearest-resized to the working size, (1, 1, h, w), > 0 -> 1.

    A blank mask stays all zeros, so the consistency term covers the whole image: the authors'
    ``inference()`` tests ``mask.sum == 0.0`` (a method, never equal to 0) and never inverts it
    (docs/methods.md, EasyDrag 15).
    """
    m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask).float()
    m = m.reshape(1, 1, *m.shape[-2:])
    if tuple(m.shape[-2:]) != tuple(work_hw):
        m = F.interpolate(m, size=tuple(work_hw), mode="nearest")
    return binarize_mask(m)


def invert_all(eps_fn, latent0: torch.Tensor, schedule: DDIMSchedule) -> list[torch.Tensor]:
    """DDIM inversion through the whole schedule keeping every latent (51 for 50 steps).

    ``latents[k]`` is at the k-th inversion timestep (``[0]`` = the clean latent); the drag
    works on ``latents[n_actual]`` (docs/methods.md, EasyDrag 1). ``eps_fn(x, t, i)``: the
    prompt, guidance 1.
    """
    return ddim_invert(eps_fn, latent0, schedule, schedule.num_inference_steps)


def drag_module(unet, z_t: torch.Tensor, timestep: int, cond: torch.Tensor,
                handles: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                schedule: DDIMSchedule, feature_idx, objective: CosineDragObjective,
                lr: float, n_steps: int, reference: bool = True,
                forward_fn=None, cache_reference: bool = False,
                fused_optimizer: bool = False, capture=None) -> DragOptimisation:
    """The shared drag optimisation with EasyDrag's target, feature composition and loss.

    ``mask`` (1, 1, h, w) at image resolution is the drawn mask (the supervision grid is the
    image); the auto-mask callback replaces it from step 0 when active. ``cache_reference``:
    the fast path's batch-1 drag against recorded reference keys/values; ``fused_optimizer``
    its one-kernel Adam; ``capture`` ``speed=graphs``' compiled steps.
    """
    target = ReferenceLatentTarget(reference, forward_fn, cache_reference)
    return DragOptimisation(unet, target, z_t, timestep, cond, handles, targets, mask, schedule,
                            feature_idx, objective, lr, n_steps,
                            compose_features=concat_then_resize,
                            fused_optimizer=fused_optimizer, capture=capture)


def sample_with_reference(model, latent: torch.Tensor, cond: torch.Tensor,
                          uncond: torch.Tensor | None, schedule: DDIMSchedule, start_index: int,
                          inversion_latents: list[torch.Tensor], guidance: float,
                          ref_start_step: int, offset: int = 1, enabled: bool = True,
                          on_step=None, batched: bool = False) -> torch.Tensor:
    """Denoise the dragged latent from ``timesteps[start_index]`` with reference guidance
    (``batched``: a guided step's two predictions in one UNet call, the fast path)."""
    predictor = ReferenceGuidance(model, cond, uncond, guidance, inversion_latents,
                                  schedule.num_inference_steps, ref_start_step, offset, enabled,
                                  batched)
    return ddim_sample(predictor, latent, schedule, start_index, on_step=on_step)


# -- the method ------------------------------------------------------------------------------

@dataclass
class _Prompts:
    cond: torch.Tensor
    uncond: torch.Tensor


class EasyDragMethod:
    """EasyDrag on one :class:`DragSample`; arguments are plain values for Hydra.

    Args:
        name: method name written with results.
        resolution: long side of the working image (None: the model's resolution, 512 for
            SD 1.5); sides are rounded to multiples of 64.
        n_inference_step: DDIM schedule length (50).
        n_actual_inference_step: steps inverted/denoised; the drag is at
            ``timesteps[50 - n]`` (681 for 35).
        feature_idx: UNet features (dragexp index: 0 = mid, k = ``up_blocks[k-1]``); [2, 3] =
            EasyDrag's ``up_blocks[1]`` and ``up_blocks[2]`` outputs.
        lr, n_pix_step: Adam lr and the maximum number of optimisation steps.
        r_m, jump, snap, on_target_weight, share_weight: the loss values
            (:class:`CosineDragObjective`); the tracker has its own ``jump``/``snap`` in
            ``configs/callbacks/easydrag.yaml`` (the authors use one value for both), and the
            stop distance (1 image pixel) is the stop callback's.
        objective: a loss strategy object replacing the one built from those values.
        training_reference: batch-2 reference attention during the drag.
        reference_only: reference guidance during sampling; guidance_scale: its w (also CFG).
        ref_start_step: reference guidance for the last ``ref_start_step`` denoising steps.
        reference_offset: 1 = the authors' one-step-less-noisy reference latent; 0 = aligned.
        neg_same_prompt: negative prompt := prompt (the authors' default); otherwise the prompt
            gets ", " + ``a_prompt`` and ``n_prompt`` is the negative prompt.
        schedule: "ldm" (alpha-bar as the authors' ldm code computes it) or "diffusers".
        prompt_override: use this prompt instead of the sample's.
        seed: seeds the VAE posterior sample.
    """

    def __init__(self, name: str = "easydrag", resolution: int | None = None,
                 n_inference_step: int = 50, n_actual_inference_step: int = 35,
                 feature_idx=(2, 3), lr: float = 0.01, n_pix_step: int = 50, r_m: int = 0,
                 jump: float = 12.0, snap: float = 18.0, on_target_weight: float = 0.1,
                 share_weight: float = 0.1, objective=None,
                 training_reference: bool = True,
                 reference_only: bool = True, guidance_scale: float = 4.0,
                 ref_start_step: int = 20, reference_offset: int = 1,
                 neg_same_prompt: bool = True, a_prompt: str = DEFAULT_A_PROMPT,
                 n_prompt: str = DEFAULT_N_PROMPT, schedule: str = "ldm",
                 prompt_override: str | None = None, seed: int = 0):
        self.name = name
        self.resolution = None if resolution is None else int(resolution)
        if schedule not in ("ldm", "diffusers"):
            raise ValueError(f"method.schedule must be 'ldm' or 'diffusers', got {schedule!r}")
        n = int(n_inference_step)
        self.schedule = DDIMSchedule.sd15_ldm(n) if schedule == "ldm" else DDIMSchedule.sd15(n)
        self.n_actual_steps = int(n_actual_inference_step)
        self.schedule.edit_index(self.n_actual_steps)          # validates the range early
        self.feature_idx = ([int(feature_idx)] if isinstance(feature_idx, (int, str))
                            else [int(i) for i in feature_idx])
        self.lr, self.n_pix_step = float(lr), int(n_pix_step)
        self.objective = objective or CosineDragObjective(r_m, jump, snap, on_target_weight,
                                                          share_weight)
        self.training_reference = bool(training_reference)
        self.reference_only = bool(reference_only)
        self.guidance_scale = float(guidance_scale)
        self.ref_start_step = int(ref_start_step)
        self.reference_offset = int(reference_offset)
        if self.reference_offset not in (0, 1):
            raise ValueError(f"method.reference_offset must be 1 (authors' code) or 0, got "
                             f"{reference_offset}")
        self.neg_same_prompt = bool(neg_same_prompt)
        self.a_prompt, self.n_prompt = a_prompt, n_prompt
        self.prompt_override = prompt_override
        self.seed = int(seed)

    def prompts(self, models, prompt: str) -> _Prompts:
        """The authors' prompt handling: negative = prompt by default (CFG then collapses)."""
        if self.neg_same_prompt:
            cond = models.encode_prompt(prompt)
            return _Prompts(cond, cond)
        return _Prompts(models.encode_prompt(f"{prompt}, {self.a_prompt}"),
                        models.encode_prompt(self.n_prompt))

    def edit_steps(self) -> int:
        """DDIM steps inverted and denoised (``n_actual_inference_step``)."""
        return self.n_actual_steps

    def edit(self, sample: DragSample, models, ctx: EditContext) -> EditResult:
        """Edit one sample: inversion, the drag on ``latents[n]`` with the reference branch,
        then reference-guided sampling. EasyDrag trains no LoRA (``ctx.lora_*`` unused)."""
        from ...data.sample import SampleError

        speed, callbacks, precision = ctx.speed, list(ctx.callbacks), ctx.precision
        timer = StageTimer()
        device = models.device
        H, W = sample.image.shape[:2]
        work = working_size((H, W), long_side=self.resolution or int(models.resolution))
        try:
            handles, targets = drag_points(sample.points, (H, W), work)
        except ValueError as exc:
            raise SampleError(f"sample {sample.name!r}: points: {exc}") from exc
        check_before_edit(callbacks, ReferenceLatentTarget(self.training_reference), handles,
                          sample)
        mask = user_mask(sample.mask, work).to(device)
        prompt = prompt_of(sample, self.prompt_override)
        autocast = autocast_for(precision, device)
        prompts = self.prompts(models, prompt)
        cond = prompts.cond.float()
        uncond = cond if prompts.uncond is prompts.cond else prompts.uncond.float()

        image = image_tensor(resize_image(sample.image, work))
        with timer("encode"), torch.no_grad():
            gen = torch.Generator().manual_seed(self.seed)
            latent0 = models.encode_image(image.to(device, models.vae.dtype), sample=True,
                                          generator=gen).float()
        start = self.schedule.edit_index(self.n_actual_steps)
        t = self.schedule.timesteps[start]
        capture = speed.step_capture(device)
        with timer("inversion"), autocast, captured_unet(models.unet, capture):
            latents = [x.float() for x in
                       invert_all(NoisePredictor(models.unet, cond), latent0, self.schedule)]
        z_t = latents[self.n_actual_steps]

        recorder = trajectory_recorder(callbacks)
        module = drag_module(models.unet, z_t, t, cond, handles.to(device), targets.to(device),
                             mask, self.schedule, self.feature_idx, self.objective, self.lr,
                             self.n_pix_step, self.training_reference,
                             cache_reference=speed.cache_reference,
                             fused_optimizer=speed.fused_optimizer,
                             capture=capture)
        with timer("optimisation"):
            fit_drag(module, callbacks, precision=precision, progress=ctx.progress)
        with timer("denoising"), autocast, captured_unet(models.unet, capture):
            out = sample_with_reference(ReferenceAttentionUNet(models.unet), module.result,
                                        cond, uncond, self.schedule, start, latents,
                                        self.guidance_scale, self.ref_start_step,
                                        self.reference_offset, self.reference_only,
                                        batched=speed.batch_guidance)
        with timer("decode"):
            result = decode_image(models, out, (H, W))

        return edit_result(result, handles, targets, work, recorder, module, timer,
                           extras={"images": callback_images(callbacks, (H, W)),
                                   "working_size": list(work)})
