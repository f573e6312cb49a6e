"""DragonDiffusion's memory bank and visual cross-attention, as an attention controller.

docs/methods.md, DragonDiffusion 2: during the inversion every *decoder* self-attention
layer (the ``attn1`` of ``up_blocks.{1,2,3}``; 9 layers in SD 1.5) stores its projected keys and
values at every step, under the index of the sampling step with the same timestep. While
sampling, from step 5 on, each such layer attends to

- drag mode: its own keys/values *concatenated* (along tokens) with the bank's;
- move mode: the bank's keys/values *instead of* its own;
- appearance / paste mode (steps 0..35): the base image's bank entries outside the object
  followed by the second image's inside its object, instead of its own.

The bank is repeated over the batch (the uncond and cond halves of classifier-free guidance see
the same bank). Everything runs through the shared
:class:`~dragexp.core.attention.ControlledAttnProcessor`: :class:`DragonAttentionControl` only decides
keys and values.

Size: a bank holds ``2 * sum_l tokens_l * channels_l`` numbers per stored step (K and V). For SD
1.5 at 512 x 512 that is 13.76 M numbers = 55 MB in fp32 per step, 2.75 GB for all 50 steps
(:func:`bank_size_bytes`). :class:`MemoryBank` keeps it in bounds by storing only the steps the
sampler will read (45 of 50 for drag / move, 36 for appearance / paste), and optionally in fp16
and / or on the CPU (the authors keep it on the CPU, in fp16 since their app runs in fp16).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...core.attention import AttentionController, self_attention_layers, transformer_blocks

__all__ = ["MemoryBank", "DragonAttentionControl", "decoder_self_attention_layers",
           "bank_size_bytes"]

MODES = ("drag", "move", "appearance", "paste")


def decoder_self_attention_layers(unet: nn.Module) -> list[str]:
    """Processor names of every self-attention layer in the UNet's decoder (``up_blocks``)."""
    return self_attention_layers(unet, regions=("up",))


class MemoryBank:
    """Keys and values per (step, layer), recorded during inversion.

    Args:
        steps: step indices to keep (None = every step); a step outside is not stored.
        dtype: storage dtype (None = as computed; ``torch.float16`` halves the size).
        device: storage device (None = where computed; ``"cpu"`` offloads from the GPU).
    """

    def __init__(self, steps: Iterable[int] | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None):
        self.steps = None if steps is None else {int(s) for s in steps}
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.entries: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def wants(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def put(self, step: int, layer: str, key: torch.Tensor, value: torch.Tensor) -> None:
        if not self.wants(step):
            return

        def keep(x: torch.Tensor) -> torch.Tensor:
            return x.detach().to(device=self.device or x.device, dtype=self.dtype or x.dtype).clone()

        self.entries.setdefault(int(step), {})[layer] = (keep(key), keep(value))

    def get(self, step: int, layer: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            k, v = self.entries[int(step)][layer]
        except KeyError:
            raise KeyError(f"memory bank has no entry for step {step}, layer {layer!r} (stored "
                           f"steps: {sorted(self.entries)})") from None
        return k.to(like.device, like.dtype), v.to(like.device, like.dtype)

    def has(self, step: int) -> bool:
        return int(step) in self.entries

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layers in self.entries.values()
                   for kv in layers.values() for t in kv)

    def clear(self) -> None:
        self.entries.clear()


def bank_size_bytes(unet: nn.Module, latent_hw: tuple[int, int], steps: int = 50,
                    batch: int = 1, bytes_per_number: int = 4) -> int:
    """Size of a memory bank computed from the UNet's shapes (no forward needed).

    Each decoder self-attention layer of ``up_blocks[b]`` sees ``tokens = h * w`` of that block's
    resolution (the latent halved once per down-sampler before it, doubled by every up-sampler of
    the up blocks before ``b``) and ``channels`` = its inner dimension.
    """
    n_down = sum(1 for blk in unet.down_blocks if getattr(blk, "downsamplers", None))
    h, w = latent_hw
    for _ in range(n_down):
        h, w = (h + 1) // 2, (w + 1) // 2
    total = 0
    for b, blk in enumerate(unet.up_blocks):
        for info in transformer_blocks(unet):
            if info.region == "up" and info.block == b:
                attn = unet.get_submodule(info.name).attn1
                total += 2 * h * w * attn.to_k.out_features
        if getattr(blk, "upsamplers", None):
            h, w = h * 2, w * 2
    return total * steps * batch * bytes_per_number


class DragonAttentionControl(AttentionController):
    """Memory-bank recording and the visual cross-attention (see the module docstring).

    The sampler sets :attr:`phase` and :attr:`step` before each UNet call:

    - ``"record"``: inversion; decoder self-attention layers store K/V at ``step``.
    - ``"sample"``: editing step ``step``; the bank is read as ``mode`` says when
      :meth:`uses_bank` holds, and the image prompt acts when :attr:`ip_active`.
    - ``"plain"``: ordinary attention (the estimator's forward, time-travel re-inversions).

    Args:
        layers: processor names of the decoder self-attention layers.
        bank: where K/V are stored.
        mode: ``drag`` (concatenate), ``move`` (replace), ``appearance`` /
            ``paste`` (masked composite of the two images' banks).
        bank_steps: inclusive range of sampling steps that read the bank ((5, None) = from 5 on);
            None = never: no visual cross-attention, and nothing is stored (the paper's
            "w/o visual cross-attention" ablation, Fig. 9).
        ip_steps: inclusive range of sampling steps in which the image prompt acts.
        blend_masks: for appearance / paste, ``(base, replace)`` working-size masks.
    """

    def __init__(self, layers: Iterable[str], bank: MemoryBank, mode: str = "drag",
                 bank_steps: tuple[int | None, int | None] | None = (5, None),
                 ip_steps: tuple[int, int] = (10, 19),
                 blend_masks: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"memory-bank mode must be one of {MODES}, got {mode!r}")
        self.layers = set(layers)
        self.bank = bank
        self.mode = mode
        self.bank_steps = bank_steps
        self.ip_steps = ip_steps
        self.blend_masks = blend_masks
        self.phase = "plain"
        self._token_masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- state -------------------------------------------------------------------------
    def set(self, phase: str, step: int = 0) -> None:
        self.phase, self.step = phase, int(step)

    @contextmanager
    def plain(self) -> Iterator[None]:
        old = (self.phase, self.step)
        self.phase = "plain"
        try:
            yield
        finally:
            self.phase, self.step = old

    def uses_bank(self, step: int) -> bool:
        if self.bank_steps is None:
            return False
        lo, hi = self.bank_steps
        return (lo is None or step >= lo) and (hi is None or step <= hi)

    def bank_step_indices(self, n_steps: int) -> list[int]:
        """The sampling steps whose bank entries will be read (what :class:`MemoryBank` keeps)."""
        return [i for i in range(n_steps) if self.uses_bank(i)]

    @property
    def ip_active(self) -> bool:
        """Image-prompt attention on: every recording call (the reference's ``iter_cur=-1``,
        though inversion carries no image tokens) and sampling steps in ``ip_steps``."""
        if self.phase == "record":
            return True
        return self.phase == "sample" and self.ip_steps[0] <= self.step <= self.ip_steps[1]

    def active(self, layer: str) -> bool:
        return layer in self.layers and self.phase in ("record", "sample")

    # -- keys and values ----------------------------------------------------------------
    def keys_values(self, layer, query, key, value):
        if layer not in self.layers:
            return key, value
        if self.phase == "record":
            self.bank.put(self.step, layer, key, value)
            return key, value
        if self.phase != "sample" or not self.uses_bank(self.step):
            return key, value
        k_ref, v_ref = self.bank.get(self.step, layer, key)
        b = key.shape[0]
        if self.mode == "drag":
            rep = b // k_ref.shape[0]
            return (torch.cat([key, k_ref.repeat(rep, 1, 1)], dim=1),
                    torch.cat([value, v_ref.repeat(rep, 1, 1)], dim=1))
        if self.mode == "move":
            rep = b // k_ref.shape[0]
            return k_ref.repeat(rep, 1, 1), v_ref.repeat(rep, 1, 1)
        fg, bg = self._blend_token_masks(k_ref.shape[1], key.device)
        k_bg = k_ref[:1][:, bg].repeat(b, 1, 1)
        v_bg = v_ref[:1][:, bg].repeat(b, 1, 1)
        k_fg = k_ref[1:][:, fg].reshape(k_ref.shape[0] - 1, -1, k_ref.shape[2]).repeat(b, 1, 1)
        v_fg = v_ref[1:][:, fg].reshape(v_ref.shape[0] - 1, -1, v_ref.shape[2]).repeat(b, 1, 1)
        return torch.cat([k_bg, k_fg], dim=1), torch.cat([v_bg, v_fg], dim=1)

    def _blend_token_masks(self, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token masks at a layer's resolution: the reference derives the grid from the token
        count, ``scale = sqrt(H * W / tokens)``, and resizes each mask (nearest) to
        ``(int(H / scale), int(W / scale))``."""
        if tokens not in self._token_masks:
            if self.blend_masks is None:
                raise ValueError(f"memory-bank mode {self.mode!r} needs blend_masks (base, replace)")
            base, replace = self.blend_masks
            H, W = replace.shape[-2:]
            scale = np.sqrt(W * H / tokens)
            size = (int(H / scale), int(W / scale))
            if size[0] * size[1] != tokens:
                raise ValueError(f"the working size {H}x{W} does not map onto a {tokens}-token "
                                 "attention layer (use sides that are multiples of 64)")
            fg = F.interpolate((replace > 0.5).float()[None, None], size).reshape(-1) > 0.5
            bg = F.interpolate((base > 0.5).float()[None, None], size).reshape(-1) < 0.5
            self._token_masks[tokens] = (fg.to(device), bg.to(device))
        return self._token_masks[tokens]
