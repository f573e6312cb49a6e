"""How fast an edit runs: the ``faithful`` and ``fast`` settings (``configs/speed/``).

``faithful`` is the authors' order of work; with ``precision: null`` it runs at
``trainer.precision`` (fp32 by default, the conformance cases' arithmetic; ``16-mixed`` is the
authors' own GPU precision). ``fast`` changes only how the same edit is computed:

* ``precision``: bf16 autocast on CUDA (base weights bf16, optimised tensors and LoRA fp32);
  on the CPU every setting runs fp32 (docs/methods.md, Framework 4).
* ``channels_last``: UNet and VAE convolutions in NHWC, what cuDNN's fast kernels want
  (with cuDNN's autotuner on).
* ``compile``: ``torch.compile`` of the UNet's ResNet blocks (the blocks no hook, processor
  swap or LoRA adapter touches, so drag hooks and reference control stay eager). Off in
  ``fast`` by default: see the README's speed section for where it pays.
* ``reuse_initial_forward``: F0 and x_{t-1}^init come from the first optimisation step's
  forward (same input, same values) instead of a separate no-grad forward.
* ``cache_reference``: EasyDrag's frozen reference branch ``z_t^orig`` is run once; its
  decoder self-attention keys/values are kept and the drag runs at batch 1.
* ``batch_guidance``: EasyDrag's reference-guided steps make their two predictions (plain
  with the negative prompt; reading the reference) in one UNet call on ``[x, x, ref]``;
  DragonDiffusion's guided steps run the energy's estimator once on ``[x, x, ref]`` (two leaves
  for the edit and content energies, the inversion latent for the reference features) and take
  both gradients from one backward, instead of three estimator calls and two backward passes.
* ``single_branch``: denoising without reference control (DragNoise) drops the reference
  branch whose output is never used.
* ``merge_lora``: after LoRA training, inversion, drag and denoising run with the LoRA folded
  into the base weights (:func:`dragexp.core.lora.merged_lora`): a LoRA UNet forward launches as
  many kernels as a plain one (725 instead of 1238 at SD-1.5's topology), which is what an
  eager batch-1 UNet call on a GPU pays for. In fp16/bf16 the fold rounds ``s B A`` to the
  weights' precision.
* ``fused_optimizer``: the LoRA's AdamW and the drag's Adam update every parameter in one
  fused kernel (``fused=True``) instead of a few kernels per parameter tensor (LoRA: 256
  tensors, 2562 launches per step on the CPU's per-tensor loop, about 520 with ``foreach``).
* ``lora_prefetch``: LoRA training draws every step's random numbers up front (the same
  sequence), encodes each distinct augmented view once, and logs no per-step loss, so a step
  makes no host round trip.

* ``lean_unet``: the same UNet function in fewer kernel launches
  (:mod:`dragexp.performance.lean_unet`): fused self-attention QKV, the prompt's
  cross-attention keys/values computed once per edit, no multiplications or divisions by 1.0,
  the time embedding's SiLU applied once (726 -> 587 launches per call at SD-1.5's topology).

* ``graphs`` (``speed=graphs``: the fast path plus this): every drag and LoRA step runs as
  compiled graphs (:mod:`dragexp.performance.capture`): the forward with its backward, and the
  optimiser step, each traced once per edit with ``fullgraph=True``; replayed as CUDA graphs
  on CUDA (``graphs_backend: auto`` = inductor, ``reduce-overhead``), run through AOTAutograd
  with eager kernels on the CPU (correctness, not speed). Needs bf16-mixed or fp32.

SDPA attention is used in both settings: diffusers' default processor and
:class:`dragexp.core.attention.ControlledAttnProcessor` both call
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
from torch import nn

from .lean_unet import set_lean

log = logging.getLogger("dragexp")


@dataclass(frozen=True)
class SpeedSettings:
    """One speed setting; every field defaults to the faithful choice."""

    name: str = "faithful"
    precision: str | None = None
    channels_last: bool = False
    compile: bool = False
    reuse_initial_forward: bool = False
    cache_reference: bool = False
    batch_guidance: bool = False
    single_branch: bool = False
    merge_lora: bool = False
    fused_optimizer: bool = False
    lora_prefetch: bool = False
    lean_unet: bool = False
    graphs: bool = False
    graphs_backend: str = "auto"

    @classmethod
    def from_config(cls, cfg) -> "SpeedSettings":
        """From a mapping (the ``speed`` config group); unknown keys are an error naming them."""
        if cfg is None:
            return cls()
        if isinstance(cfg, SpeedSettings):
            return cfg
        values = dict(cfg)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"speed: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def step_capture(self, device: torch.device | str):
        """The :class:`dragexp.performance.capture.StepCapture` of ``graphs``, or None."""
        if not self.graphs:
            return None
        from .capture import StepCapture
        return StepCapture.for_device(device, self.graphs_backend)


def _resnet_blocks(unet: nn.Module) -> list[nn.Module]:
    return [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]


def apply_to_models(models, settings: SpeedSettings):
    """Put a model bundle in the memory format / compiled form ``settings`` asks for.

    Idempotent; a bundle already prepared differently is converted back first, so one process
    can benchmark both settings on the same weights.
    """
    fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
    # cuDNN's autotuner picks the NHWC kernels; the faithful setting keeps the default choice.
    torch.backends.cudnn.benchmark = settings.channels_last
    for m in (models.unet, models.vae):
        m.to(memory_format=fmt)
    if settings.compile:
        # Every ResnetBlock2D shares one code object: one compiled graph per block shape, batch
        # and grad mode, far more than dynamo's default of 8 before it falls back to eager.
        import torch._dynamo as dynamo

        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, limit):
                setattr(dynamo.config, limit, max(getattr(dynamo.config, limit), 256))
    set_lean(models.unet, settings.lean_unet)
    for block in _resnet_blocks(models.unet):
        compiled = getattr(block, "_dragexp_compiled", False)
        if settings.compile and not compiled:
            block.compile(dynamic=False)
            block._dragexp_compiled = True
        elif not settings.compile and compiled:
            block._compiled_call_impl = None
            block._dragexp_compiled = False
    return models
