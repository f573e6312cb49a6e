"""DragonDiffusion (and its DiffEditor variant): editing by energy guidance during sampling.

One pipeline per task, as the authors' ``src/demo/model.py`` runs it (docs/methods.md,
DragonDiffusion 1-16):

    resize to the working size -> encode (posterior mean) -> DDIM inversion, all 50 steps, with
    the memory bank -> the task's masks and z_T pre-processing -> guided DDIM sampling with the
    visual cross-attention to the bank -> decode -> resize back to the source size

No LoRA and no latent optimisation. Tasks (``method.task``):

- ``drag``: points (and the user mask, 1 = editable); 3x3 feature patches per point.
- ``move``: the mask is the object; the shift is ``extras['shift'] = [dx, dy]`` or the first
  click pair (target - handle); ``extras['scale']`` (or ``method.resize_scale``) resizes too.
- ``resize``: ``move`` with a scale (``extras['scale']`` or ``method.resize_scale != 1``) and a
  shift of ``extras['shift']`` or none.
- ``appearance``: the mask is the object; ``extras['image2']`` holds the new appearance inside
  ``extras['mask2']``; ``extras['prompt2']`` its prompt (default: the prompt).
- ``paste``: ``extras['image2']`` holds the object inside ``extras['mask2']``; it is pasted with
  ``extras['shift']`` (or the first click pair) and ``extras['scale']``.

Each run function (:func:`run_drag`, :func:`run_move`, :func:`run_blend`) takes a
:class:`DragonRun` (the tensors, numbers and sampler parts every task shares, with the reference
features' implementation chosen once per edit) and the task's inputs; it is what both
:class:`DragonDiffusionMethod` and the conformance adapters call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ...core.schedule import DDIMSchedule
from ...core.stages import StageTimer
from ..base import (EditContext, EditResult, autocast_for, decode_image, fixed_points_result,
                    image_tensor, prompt_of, resize_image, working_size)
from .energy import (DecoderFeatureEstimator, ReferenceLatents, guidance_appearance, guidance_drag,
                     guidance_move, guidance_paste)
from .memory_bank import DragonAttentionControl, MemoryBank, decoder_self_attention_layers
from .regions import (as_upload_mask, copy_latent_patches, feature_scale, latent_mask, move_latent,
                      nearest, paste_image, paste_latent, process_appearance, process_drag,
                      process_move, process_paste)
from .sampling import DragonSchedule, DragonTrace, dragon_edit, invert_with_bank

__all__ = ["TASK_DEFAULTS", "DragonParams", "DragonRun", "StepReferenceFeatures",
           "BatchedReferenceFeatures", "run_drag", "run_move", "run_blend",
           "DragonDiffusionMethod", "TASKS", "task_inputs", "up_block_sizes"]

TASKS = ("drag", "move", "resize", "appearance", "paste")
# The authors' UI defaults of each tab (energy_scale in UI units, x 1e3 inside): the numbers a
# task runs with where method.<key> is null. A key a tab lacks has no term in that task.
TASK_DEFAULTS = {
    "drag": dict(guidance_scale=4.0, energy_scale=2.0, w_edit=4.0, w_content=6.0, w_inpaint=0.2),
    "move": dict(guidance_scale=4.0, energy_scale=0.5, w_edit=4.0, w_content=6.0, w_contrast=0.2,
                 w_inpaint=0.8, resize_scale=1.0),
    "resize": dict(guidance_scale=4.0, energy_scale=0.5, w_edit=4.0, w_content=6.0,
                   w_contrast=0.2, w_inpaint=0.8, resize_scale=1.0),
    "appearance": dict(guidance_scale=5.0, energy_scale=2.0, w_edit=3.5, w_content=5.0),
    "paste": dict(guidance_scale=4.0, energy_scale=1.5, w_edit=4.0, w_content=6.0),
}
_MODE = {"drag": "drag", "move": "move", "resize": "move", "appearance": "appearance",
         "paste": "paste"}


@dataclass
class DragonParams:
    """Numbers of one edit (the authors' names; ``energy_scale`` is absolute: UI value x 1e3).

    The task's own numbers have no defaults here (:data:`TASK_DEFAULTS` holds the authors').
    """

    guidance_scale: float
    energy_scale: float
    w_edit: float
    w_content: float
    w_inpaint: float = 0.0        # 0: no inpainting term
    w_contrast: float = 0.0       # 0: no contrast term
    resize_scale: float = 1.0     # 1: no resizing
    sde_strength: float = 0.4
    sde_strength_un: float = 0.0
    up_ft_index: tuple[int, ...] = (1, 2)
    up_scale: int = 2
    move_layer_weights: tuple[float, ...] | None = None
    latent_copy_border: str = "error"
    inpainting_guidance: bool = True
    plan: DragonSchedule = field(default_factory=DragonSchedule)


def up_block_sizes(unet) -> dict[int, int]:
    """The reference's ``SIZES``: how many times smaller than the latent each ``up_blocks[k]``
    output is (4, 2, 1, 1 for SD 1.5), from the up-samplers after block k."""
    n = len(unet.up_blocks)
    return {k: 2 ** sum(1 for j in range(k + 1, n) if getattr(unet.up_blocks[j], "upsamplers", None))
            for k in range(n)}


class StepReferenceFeatures:
    """The authors' reference features: the estimator's features of the inversion latent at
    step i, computed once per step (no gradient) and read by the guidance."""

    split = False

    def __init__(self):
        self.cache: dict[tuple, list[torch.Tensor]] = {}

    def features(self, estimator, inv: Sequence[torch.Tensor], i: int, t, part: slice):
        key = (i, part.start, part.step)
        if key not in self.cache:
            with torch.no_grad():
                self.cache = {k: v for k, v in self.cache.items() if k[0] == i}
                self.cache[key] = [f.detach() for f in estimator(inv[-(i + 1)][part], t)]
        return self.cache[key]


class BatchedReferenceFeatures:
    """The fast path (``speed.batch_guidance``): the inversion latent itself, to run in the same
    estimator call as the current latent, both gradients from one backward (``split``)."""

    split = True

    def features(self, estimator, inv: Sequence[torch.Tensor], i: int, t, part: slice):
        return ReferenceLatents(inv[-(i + 1)][part])


@dataclass
class DragonRun:
    """What every task's run shares: the models' tensors, the numbers, the sampler's parts and
    the implementation of the reference features, chosen once per edit.

    ``init_latent`` (same shape as z_T) replaces the inversion's z_T as the sampler's start (the
    paper's "w/o inversion prior" ablation, Fig. 9: random z_T); the task's z_T edit then acts
    on it, and the memory bank and the guidance's reference features still come from the
    inversion. ``reference``: :class:`StepReferenceFeatures` (the authors') or
    :class:`BatchedReferenceFeatures` (``speed.batch_guidance``).
    """

    unet: Any
    cond: torch.Tensor
    uncond: torch.Tensor
    params: DragonParams
    estimator: Any
    schedule: DDIMSchedule
    controller: DragonAttentionControl | None = None
    emb_im: torch.Tensor | None = None
    emb_im_uncond: torch.Tensor | None = None
    trace: DragonTrace | None = None
    timer: StageTimer = field(default_factory=StageTimer)
    sizes: dict[int, int] | None = None
    init_latent: torch.Tensor | None = None
    reference: StepReferenceFeatures | BatchedReferenceFeatures = field(
        default_factory=StepReferenceFeatures)

    def invert(self, latent0: torch.Tensor, cond: torch.Tensor | None = None):
        """DDIM inversion of every step, filling the memory bank (timed)."""
        with self.timer("inversion"):
            return invert_with_bank(self.unet, latent0, self.cond if cond is None else cond,
                                    self.schedule, self.controller)

    def start(self, inv: Sequence[torch.Tensor]) -> torch.Tensor:
        """The latent the task's z_T pre-processing starts from: the inversion's last latent
        (the reference modifies it in place, and step 0's reference features read it) or
        ``init_latent`` (the inversion's latents stay untouched)."""
        if self.init_latent is None:
            return inv[-1]
        if self.init_latent.shape[-2:] != inv[-1].shape[-2:]:
            raise ValueError(f"init_latent of shape {tuple(self.init_latent.shape)} does not "
                             f"match z_T of shape {tuple(inv[-1].shape)}")
        return self.init_latent.to(inv[-1]).clone()

    def ref(self, inv: Sequence[torch.Tensor], part: slice = slice(None)):
        """``(i, t) -> reference features`` of the inversion's batch rows ``part``."""
        return lambda i, t: self.reference.features(self.estimator, inv, i, t, part)

    def sample(self, latent_in: torch.Tensor, guidance, sde_mask: torch.Tensor) -> torch.Tensor:
        """The guided sampling every task ends with (:func:`dragon_edit`), timed as denoising."""
        p = self.params
        with self.timer("denoising"):
            return dragon_edit(self.unet, latent_in, self.cond, self.uncond, self.schedule,
                               p.plan, guidance, self.controller, p.guidance_scale,
                               p.energy_scale, p.sde_strength, p.sde_strength_un, sde_mask,
                               self.emb_im, self.emb_im_uncond, trace=self.trace)


def run_drag(run: DragonRun, latent0, points_xy, mask_upload: np.ndarray,
             working_hw: tuple[int, int], input_scale: float) -> dict[str, Any]:
    """``run_drag``: inversion with the memory bank, ``process_drag``, the in-place latent patch
    copy, then guided sampling in drag mode. Returns a dict with ``final``, ``inversion``
    (latents; the last one modified in place by the copy, as in the reference), ``z_T`` (the
    last latent before the copy), ``regions``."""
    p = run.params
    inv = run.invert(latent0)
    regions = process_drag(mask_upload, points_xy, working_hw, input_scale,
                           feature_scale(p.up_ft_index, p.up_scale, run.sizes)).to(latent0.device)
    z_T = inv[-1].clone() if run.init_latent is None else run.init_latent.clone()
    latent_in = copy_latent_patches(run.start(inv), regions, p.up_scale, p.latent_copy_border)
    ref = run.ref(inv)

    def guidance(i, t, x):
        return guidance_drag(run.estimator, x, ref(i, t), t, regions.mask_x0,
                             regions.handle_patches, regions.target_patches, regions.mask_other,
                             p.energy_scale, p.w_edit, p.w_inpaint, p.w_content, p.up_scale,
                             inpaint=p.inpainting_guidance, split=run.reference.split)

    final = run.sample(latent_in, guidance, latent_mask(regions.mask_x0, latent_in.shape[-2:]))
    return dict(final=final, inversion=inv, regions=regions, z_T=z_T)


def run_move(run: DragonRun, latent0, mask_upload: np.ndarray, working_hw, input_scale: float,
             dx: float, dy: float, mask_ref_upload=None) -> dict[str, Any]:
    """``run_move``: object moving / resizing (``dx, dy`` in upload pixels); the object is
    moved within ``run.init_latent`` when one is given."""
    p = run.params
    inv = run.invert(latent0)
    regions = process_move(mask_upload, working_hw, dx, dy,
                           feature_scale(p.up_ft_index, p.up_scale, run.sizes), input_scale,
                           p.resize_scale, mask_ref_upload).to(latent0.device)
    latent_in = move_latent(run.start(inv), mask_upload, working_hw, dx, dy, p.resize_scale)
    ref = run.ref(inv)

    def guidance(i, t, x):
        return guidance_move(run.estimator, x, ref(i, t), t, regions, p.energy_scale,
                             p.w_edit, p.w_content, p.w_contrast, p.w_inpaint, p.up_scale,
                             p.move_layer_weights, inpaint=p.inpainting_guidance,
                             split=run.reference.split)

    m = nearest(regions.mask_x0, regions.mask_cur.shape[-2:]) > 0.5
    m = (regions.mask_cur.float() + m.float()) > 0.5
    sde_mask = (nearest(m, latent_in.shape[-2:]) > 0.5).to(latent_in.dtype)
    return dict(final=run.sample(latent_in, guidance, sde_mask), inversion=inv, regions=regions)


def run_blend(run: DragonRun, task: str, latent_base, latent_replace, cond_replace,
              mask_upload: np.ndarray, mask_replace_upload: np.ndarray | None, working_hw,
              input_scale: float, dx: float = 0.0, dy: float = 0.0) -> dict[str, Any]:
    """``run_appearance`` / ``run_paste``: both images inverted together (batch 2, each with its
    prompt); the memory bank composites the base's background with the second image's object.
    ``run.init_latent`` replaces the base image's z_T; a pasted object still comes from the
    second image's inversion. These tasks have no inpainting term."""
    p = run.params
    scale = feature_scale(p.up_ft_index, p.up_scale, run.sizes)
    inv = run.invert(torch.cat([latent_base, latent_replace]), torch.cat([run.cond, cond_replace]))
    if task == "appearance":
        regions = process_appearance(mask_upload, mask_replace_upload, working_hw, scale)
        latent_in = run.start(inv)[:1]
        fn = guidance_appearance
    else:
        regions = process_paste(mask_upload, working_hw, dx, dy, scale, input_scale, p.resize_scale)
        latent_in = paste_latent(run.start(inv)[:1], inv[-1][1:], regions, working_hw, dx, dy)
        fn = guidance_paste
    regions = regions.to(latent_base.device)
    if run.controller is not None:
        run.controller.blend_masks = (regions.base, regions.replace)
    ref_base, ref_replace = run.ref(inv, slice(0, None, 2)), run.ref(inv, slice(1, None, 2))

    def guidance(i, t, x):
        return fn(run.estimator, x, ref_base(i, t), ref_replace(i, t), t, regions,
                  p.energy_scale, p.w_edit, p.w_content, p.up_scale, split=run.reference.split)

    sde_mask = latent_mask(regions.mask_base_cur, latent_in.shape[-2:])
    return dict(final=run.sample(latent_in, guidance, sde_mask), inversion=inv, regions=regions)


# -- task inputs from a DragSample ---------------------------------------------------------

@dataclass
class TaskInputs:
    mask: np.ndarray                      # uint8 0/255, upload size
    shift: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    image2: np.ndarray | None = None
    mask2: np.ndarray | None = None       # uint8 0/255, at image2's size
    prompt2: str | None = None
    mask_ref: np.ndarray | None = None


def _missing(sample, task: str, what: str, hint: str):
    from ...data.sample import SampleError

    return SampleError(f"sample {sample.name!r}: task {task!r} needs {what}: {hint}")


def _load_image(value, sample, task, key) -> np.ndarray:
    from ...data.folder import load_image_file

    if isinstance(value, np.ndarray):
        img = value
    elif hasattr(value, "convert"):
        img = np.asarray(value.convert("RGB"))
    elif isinstance(value, (str, Path)):
        img = load_image_file(Path(value).expanduser(), sample.name)
    else:
        raise _missing(sample, task, f"extras[{key!r}] as an image",
                       f"got {type(value).__name__}; give a file name (drag.yaml) or an array")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, 2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _load_mask(value, sample, task, key) -> np.ndarray:
    from ...data.folder import load_mask_file

    if isinstance(value, (str, Path)):
        m = load_mask_file(Path(value).expanduser(), sample.name)
    elif isinstance(value, np.ndarray) or hasattr(value, "convert"):
        m = np.asarray(value.convert("L") if hasattr(value, "convert") else value)
        m = m[..., 0] if m.ndim == 3 else m
    else:
        raise _missing(sample, task, f"extras[{key!r}] as a mask",
                       f"got {type(value).__name__}; give a file name (drag.yaml) or an array")
    return as_upload_mask(m > 0)


def _pair(value, sample, task, key) -> tuple[float, float]:
    try:
        dx, dy = (float(v) for v in value)
    except (TypeError, ValueError):
        raise _missing(sample, task, f"extras[{key!r}] as [dx, dy]", f"got {value!r}") from None
    return dx, dy


def task_inputs(sample, task: str, resize_scale: float = 1.0) -> TaskInputs:
    """Collect and check what ``task`` needs from ``sample`` (mask, extras); a missing input
    raises :class:`~dragexp.data.sample.SampleError` naming the sample and the input."""
    if task not in TASKS:
        raise ValueError(f"method.task must be one of {TASKS}, got {task!r}")
    ex = sample.extras or {}
    out = TaskInputs(mask=as_upload_mask(sample.mask))
    first_pair = None
    if len(sample.points) >= 2:
        (hx, hy), (tx, ty) = sample.points[0], sample.points[1]
        first_pair = (tx - hx, ty - hy)
    if task in ("move", "resize", "appearance") and not sample.has_mask:
        raise _missing(sample, task, "a mask of the object",
                       "draw one (mask.png / DragSample.mask, 1 = object)")
    if task in ("move", "resize", "paste"):
        if "shift" in ex:
            out.shift = _pair(ex["shift"], sample, task, "shift")
        elif task != "resize" and first_pair is not None:
            out.shift = first_pair
        out.scale = float(ex.get("scale", resize_scale))
        if task == "resize" and "scale" not in ex and resize_scale == 1.0:
            raise _missing(sample, task, "a scale", "extras['scale'] (e.g. 1.2) or method.resize_scale")
        if "mask_ref" in ex:
            out.mask_ref = _load_mask(ex["mask_ref"], sample, task, "mask_ref")
    if task in ("appearance", "paste"):
        for key, what in (("image2", "a second image"), ("mask2", "the object's mask on the second image")):
            if ex.get(key) is None:
                raise _missing(sample, task, f"{what} (extras[{key!r}])",
                               f"add '{key}: <file>' to drag.yaml or set DragSample.extras[{key!r}]")
        out.image2 = _load_image(ex["image2"], sample, task, "image2")
        out.mask2 = _load_mask(ex["mask2"], sample, task, "mask2")
        if out.mask2.shape != out.image2.shape[:2]:
            raise _missing(sample, task, "extras['mask2'] of the second image's size",
                           f"mask {out.mask2.shape} vs image {out.image2.shape[:2]}")
        if not out.mask2.any():
            raise _missing(sample, task, "a non-empty extras['mask2']", "the mask is empty")
        out.prompt2 = ex.get("prompt2")
    return out


# -- the method ------------------------------------------------------------------------------

class DragonDiffusionMethod:
    """DragonDiffusion / DiffEditor on one :class:`~dragexp.data.sample.DragSample`.

    Plain values only (Hydra builds it from ``configs/method/dragondiffusion*.yaml``). Per-task
    numbers left ``None`` come from :data:`TASK_DEFAULTS` (the authors' UI defaults per tab).

    Args:
        task: ``drag``, ``move``, ``resize``, ``appearance`` or ``paste``.
        alg: ``"D"`` (DragonDiffusion, default) or ``"D+"`` (DiffEditor).
        max_resolution: working area is ``max_resolution**2`` (sides x64); None = the model's
            resolution (the authors' UI default is 768).
        guidance_steps, dense_guidance_steps, time_travel_steps, time_travel_repeats, sde_steps,
            ip_steps, bank_start_step, blend_bank_steps: :class:`DragonSchedule`.
        up_ft_index: ``up_blocks`` whose outputs carry the energy ([1, 2]); ``up_scale``: their
            upsampling (2).
        latent_copy_border: ``error`` (faithful: a drag point whose 3x3 latent patch crosses the
            bottom/right border fails, as in the authors' code) or ``clip`` (copy what fits).
        memory_bank: ``enabled`` (true; false = no K/V bank and no visual cross-attention, the
            paper's "w/o visual cross-attention" ablation, Fig. 9), ``dtype`` (null / float16)
            and ``device`` (null / cpu) of the stored K/V.
        inpainting_guidance: the optional energy E_opt of the paper's Eq. 7 / 9 (drag: the
            vacated-patch term; move / resize: contrast + inpaint terms); false = the "w/o
            E_opt" ablation (paper Fig. 5). Appearance and paste have no such term.
        init_latent: ``inversion`` (z_T from DDIM inversion, faithful) or ``random`` (a
            seeded Gaussian z_T, the "w/o inversion prior" ablation, paper Fig. 9; the memory
            bank and the guidance's reference features still come from the inversion).
        image_prompt: ``enabled``, ``encoder`` (hub id / folder), ``encoder_subfolder``,
            ``adapter`` (checkpoint file or ``repo:file``), ``scale``, ``num_tokens``.
    """

    def __init__(self, name: str = "dragondiffusion", task: str = "drag", alg: str = "D",
                 n_inference_step: int = 50, max_resolution: int | None = None,
                 guidance_scale: float | None = None, energy_scale: float | None = None,
                 w_edit: float | None = None, w_content: float | None = None,
                 w_inpaint: float | None = None, w_contrast: float | None = None,
                 resize_scale: float | None = None, sde_strength: float = 0.4,
                 sde_strength_un: float = 0.0, up_ft_index: Sequence[int] = (1, 2),
                 up_scale: int = 2, move_layer_weights: Sequence[float] | None = None,
                 guidance_steps: int = 30, dense_guidance_steps: int = 10,
                 time_travel_steps: Sequence[int] = (22, 24, 26, 28), time_travel_repeats: int = 3,
                 sde_steps: Sequence[int] = (11, 19), ip_steps: Sequence[int] = (10, 19),
                 bank_start_step: int = 5, blend_bank_steps: Sequence[int] = (0, 35),
                 latent_copy_border: str = "error", memory_bank: dict | None = None,
                 image_prompt: dict | None = None, prompt_override: str | None = None,
                 seed: int = 0, inpainting_guidance: bool = True, init_latent: str = "inversion"):
        if task not in TASKS:
            raise ValueError(f"method.task must be one of {TASKS}, got {task!r}")
        if init_latent not in ("inversion", "random"):
            raise ValueError(f"method.init_latent must be 'inversion' or 'random', got {init_latent!r}")
        self.init_latent = init_latent
        self.name, self.task = name, task
        self.schedule = DDIMSchedule.sd15(int(n_inference_step))
        self.max_resolution = None if max_resolution is None else int(max_resolution)
        plan = DragonSchedule(alg, int(guidance_steps), int(dense_guidance_steps),
                              tuple(time_travel_steps), int(time_travel_repeats), tuple(sde_steps),
                              tuple(ip_steps), int(bank_start_step), tuple(blend_bank_steps))
        given = dict(guidance_scale=guidance_scale, energy_scale=energy_scale, w_edit=w_edit,
                     w_content=w_content, w_inpaint=w_inpaint, w_contrast=w_contrast,
                     resize_scale=resize_scale)
        values = {k: float(v if v is not None else TASK_DEFAULTS[task][k])
                  for k, v in given.items() if v is not None or k in TASK_DEFAULTS[task]}
        values["energy_scale"] *= 1e3   # UI units -> absolute, as run_* do
        self.params = DragonParams(**values, sde_strength=float(sde_strength),
                                   sde_strength_un=float(sde_strength_un),
                                   up_ft_index=tuple(int(k) for k in up_ft_index),
                                   up_scale=int(up_scale),
                                   move_layer_weights=None if move_layer_weights is None
                                   else tuple(float(w) for w in move_layer_weights),
                                   latent_copy_border=str(latent_copy_border),
                                   inpainting_guidance=bool(inpainting_guidance), plan=plan)
        self.bank_cfg = dict(memory_bank or {})
        self.use_bank = bool(self.bank_cfg.pop("enabled", True))
        self.ip_cfg = dict(image_prompt or {})
        self.prompt_override = prompt_override
        self.seed = int(seed)
        self._ip_cache: dict[str, Any] = {}

    # -- image prompt ------------------------------------------------------------------
    def _image_prompt(self, models, images: list[np.ndarray]):
        """(adapter, tokens, zero-image tokens) for the images, or (None, None, None)."""
        cfg = self.ip_cfg
        if not cfg.get("enabled"):
            return None, None, None
        from .image_prompt import ImagePromptAdapter, ImagePromptEncoder, load_ip_checkpoint

        key = f"{cfg.get('encoder')}|{cfg.get('adapter')}|{models.source}"
        if key not in self._ip_cache:
            if not cfg.get("adapter"):
                from ...models.errors import ModelSourceError

                raise ModelSourceError("method.image_prompt.adapter is not set (an IP-Adapter "
                                       "checkpoint: a .bin/.safetensors file or '<repo>:<file>')")
            if not cfg.get("encoder"):
                from ...models.errors import ModelSourceError

                raise ModelSourceError("method.image_prompt.encoder is not set (a Hub id or "
                                       "folder holding a CLIP vision model)")
            ckpt = load_ip_checkpoint(cfg["adapter"])
            adapter = ImagePromptAdapter.from_ip_adapter(
                models.unet, ckpt, scale=float(cfg.get("scale", 0.1)),
                num_tokens=int(cfg.get("num_tokens", 64))).to(models.device, models.dtype)
            encoder = ImagePromptEncoder(cfg["encoder"], cfg.get("encoder_subfolder"),
                                         device=models.device, dtype=models.dtype)
            self._ip_cache = {key: (adapter, encoder)}
        adapter, encoder = self._ip_cache[key]
        embs = [encoder(img, adapter) for img in images]
        return (adapter, torch.cat([e[0] for e in embs], dim=1).float(),
                torch.cat([e[1] for e in embs], dim=1).float())

    def _random_start(self, latent0: torch.Tensor) -> torch.Tensor | None:
        """z_T for ``init_latent='random'``: N(0, I) drawn on the CPU from ``seed`` (the same
        noise on every device), or None (start from the inversion)."""
        if self.init_latent != "random":
            return None
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(tuple(latent0.shape), generator=g).to(latent0)

    # -- one edit ----------------------------------------------------------------------
    def edit_steps(self) -> int:
        """DDIM steps: DragonDiffusion inverts to z_T and samples every step back."""
        return self.schedule.num_inference_steps

    def edit(self, sample, models, ctx: EditContext) -> EditResult:
        """Edit one sample with ``self.task``; the drag callbacks do not apply (no tracked
        points), nor does LoRA.

        ``ctx.speed`` (:mod:`dragexp.performance.speed`): DragonDiffusion trains nothing and has no reference
        branch to cache; besides the model-wide switches (precision, memory format, compile,
        set on the models by the caller) ``batch_guidance`` applies: each guided step runs its
        estimator once and one backward instead of three calls and two backward passes.
        """
        speed, precision = ctx.speed, ctx.precision
        timer = StageTimer()
        task = self.task
        inp = task_inputs(sample, task, self.params.resize_scale)
        params = self.params
        if task in ("move", "resize", "paste"):
            params = DragonParams(**{**params.__dict__, "resize_scale": inp.scale})
        device = models.device
        H0, W0 = sample.image.shape[:2]
        res = self.max_resolution or int(models.resolution)
        H, W = working_size((H0, W0), area=float(res) ** 2)
        input_scale = W / W0   # the authors scale points and shifts by the widths' ratio
        image = resize_image(sample.image, (H, W), Image.LANCZOS)
        prompt = prompt_of(sample, self.prompt_override)
        cond = models.encode_prompt(prompt).float()
        uncond = models.encode_prompt("").float()

        def encode(img: np.ndarray | torch.Tensor) -> torch.Tensor:
            t = img if torch.is_tensor(img) else image_tensor(img, centred=True)
            with torch.no_grad():
                return models.encode_image(t.to(device, models.vae.dtype)).float()

        image2 = None
        if inp.image2 is not None:   # the second image at the working size (PIL's default filter)
            image2 = resize_image(inp.image2, (H, W), Image.BICUBIC)
        with timer("encode"):
            latent0 = encode(image)
            ip_images = [image] if image2 is None else [image, image2]
            adapter, emb_im, emb_im_uncond = self._image_prompt(models, ip_images)
        mode = _MODE[task]
        plan = params.plan
        bank = MemoryBank(dtype=_dtype(self.bank_cfg.get("dtype")), device=self.bank_cfg.get("device"))
        controller = DragonAttentionControl(decoder_self_attention_layers(models.unet), bank, mode,
                                            plan.bank_steps(mode) if self.use_bank else None,
                                            plan.ip_steps)
        # store only the steps the sampler reads (45 of 50 for drag / move, 36 for the others)
        bank.steps = set(controller.bank_step_indices(self.schedule.num_inference_steps))
        estimator = DecoderFeatureEstimator(models.unet, cond, params.up_ft_index, controller.plain)
        trace = DragonTrace()
        sizes = up_block_sizes(models.unet)
        run = DragonRun(models.unet, cond, uncond, params, estimator, self.schedule, controller,
                        emb_im, emb_im_uncond, trace, timer, sizes,
                        init_latent=self._random_start(latent0),
                        reference=(BatchedReferenceFeatures() if speed.batch_guidance
                                   else StepReferenceFeatures()))
        from .image_prompt import dragon_attention

        with dragon_attention(models.unet, controller, adapter), autocast_for(precision, device):
            if task == "drag":
                out = run_drag(run, latent0, sample.points, inp.mask, (H, W), input_scale)
            elif mode == "move":
                out = run_move(run, latent0, inp.mask, (H, W), input_scale, inp.shift[0],
                               inp.shift[1], mask_ref_upload=inp.mask_ref)
            else:
                cond2 = models.encode_prompt(inp.prompt2 if inp.prompt2 is not None else prompt).float()
                if task == "appearance":
                    with timer("encode"):
                        latent2 = encode(image2)
                    mask, mask2 = inp.mask, inp.mask2
                else:
                    with timer("encode"):
                        latent2 = encode(paste_image(image2, params.resize_scale))
                    mask, mask2 = inp.mask2, None
                out = run_blend(run, task, latent0, latent2, cond2, mask, mask2, (H, W),
                                input_scale, dx=inp.shift[0], dy=inp.shift[1])
        bank_bytes = bank.nbytes
        bank.clear()
        with timer("decode"):
            result = decode_image(models, out["final"], (H0, W0))
        energies = [float(g.energy_edit) for g in trace.guidance]
        return fixed_points_result(
            sample, result, timer.seconds, losses=energies, num_steps=len(trace.guidance),
            extras=dict(task=task, alg=plan.alg, working_size=[H, W], memory_bank_bytes=bank_bytes,
                        unet_calls=len(trace.call_iter) + len(trace.timetravel_t)))


def _dtype(name) -> torch.dtype | None:
    if name in (None, "", "null", "none"):
        return None
    if isinstance(name, torch.dtype):
        return name
    try:
        return {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}[str(name)]
    except KeyError:
        raise ValueError(f"method.memory_bank.dtype must be null, float16, bfloat16 or float32, "
                         f"got {name!r}") from None
