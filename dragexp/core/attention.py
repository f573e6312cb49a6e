"""Attention-processor machinery shared by every method that steers self-attention.

One processor class, :class:`ControlledAttnProcessor`, does ordinary attention and asks a
*controller* for the keys and values to use. Controllers implement the methods' ideas:

* :class:`ReferenceControl` - DragDiffusion's reference-latent control (MasaCtrl's mutual
  self-attention, docs/methods.md, DragDiffusion 4): within each group of the
  batch, every element's queries attend to the keys/values of the group's first element.
  EasyDrag's reference attention is the same controller on every decoder self-attention layer
  with the reference *last* in the batch ``[edited, reference]`` (:func:`reference_attention`).

The processor computes queries, keys and values with :func:`dragexp.core.projections.project_qkv`
(``attn.to_q`` / ``to_k`` / ``to_v``, fused where the fast path prepared the layer) and calls
``to_out``, so LoRA adapters that peft placed inside those linear layers stay active.

Layers are counted from the model, never from SD 1.5 constants: :func:`transformer_blocks`
lists the UNet's transformer blocks in execution order (down, mid, up), which is how MasaCtrl
numbers them (block n owns attention calls 2n and 2n+1).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .projections import project_qkv


@dataclass(frozen=True)
class TransformerBlockInfo:
    """One transformer block: its index in execution order and where it sits."""

    index: int
    name: str           # module path of the BasicTransformerBlock
    region: str         # "down", "mid" or "up"
    block: int | None   # index into down_blocks / up_blocks (None for mid)

    @property
    def self_attn(self) -> str:
        return f"{self.name}.attn1.processor"

    @property
    def cross_attn(self) -> str:
        return f"{self.name}.attn2.processor"


def transformer_blocks(unet: nn.Module) -> list[TransformerBlockInfo]:
    """The UNet's transformer blocks in forward (execution) order: down, mid, up."""
    out: list[TransformerBlockInfo] = []

    def collect(prefix: str, module: nn.Module, region: str, block: int | None) -> None:
        for name, sub in module.named_modules():
            if hasattr(sub, "attn1") and hasattr(sub, "attn2") and hasattr(sub, "ff"):
                out.append(TransformerBlockInfo(len(out), f"{prefix}.{name}" if name else prefix,
                                                region, block))

    for i, blk in enumerate(unet.down_blocks):
        collect(f"down_blocks.{i}", blk, "down", i)
    if unet.mid_block is not None:
        collect("mid_block", unet.mid_block, "mid", None)
    for i, blk in enumerate(unet.up_blocks):
        collect(f"up_blocks.{i}", blk, "up", i)
    return out


def self_attention_layers(unet: nn.Module, start_block: int = 0,
                          regions=("down", "mid", "up")) -> list[str]:
    """Processor names of the self-attention layers selected by block index and region."""
    return [b.self_attn for b in transformer_blocks(unet)
            if b.index >= start_block and b.region in regions]


class AttentionController:
    """Decides, per layer and call, which keys/values the queries attend to.

    Subclasses override :meth:`keys_values`; returning the inputs unchanged gives ordinary
    attention. ``step`` is the denoising-step counter that the sampler advances.
    """

    def __init__(self) -> None:
        self._step = 0
        self.step_tensor = torch.zeros((), dtype=torch.int64)

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = int(value)
        # filled in place: a compiled call reads the step from this tensor, so every step of
        # a loop replays one graph (a Python int would be baked into the graph and retraced)
        self.step_tensor.fill_(self._step)

    def place(self, device: torch.device) -> None:
        """Keep :attr:`step_tensor` on the device of the UNet the controller drives."""
        if self.step_tensor.device != torch.device(device):
            self.step_tensor = self.step_tensor.to(device)

    def active(self, layer: str) -> bool:
        return False

    def keys_values(self, layer: str, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return key, value


class ReferenceControl(AttentionController):
    """Mutual self-attention: each batch group's elements attend to the group's first element.

    Args:
        layers: processor names where the control applies (e.g. ``attn1`` of transformer
            blocks ``start_layer..15``).
        start_step: first step (counted from the first executed denoising step) with control.
        total_steps: control stays on while ``step < total_steps`` (MasaCtrl's ``total_steps``).
        groups: number of equal batch chunks, each ``[reference, edited, ...]``; 2 under
            classifier-free guidance (``[u_ref, u_edit, c_ref, c_edit]``), else 1.
        ref_index: position of the reference inside each group (0 = first, DragDiffusion;
            -1 = last, EasyDrag's ``[edited, reference]``). With a group of one element every
            element is its own reference, i.e. ordinary attention.
    """

    def __init__(self, layers: list[str], start_step: int = 0, total_steps: int = 50,
                 groups: int = 1, ref_index: int = 0) -> None:
        super().__init__()
        self.layers = set(layers)
        self.start_step = int(start_step)
        self.total_steps = int(total_steps)
        self.groups = int(groups)
        self.ref_index = int(ref_index)

    def active(self, layer: str) -> bool:
        return layer in self.layers and self.start_step <= self.step < self.total_steps

    def keys_values(self, layer, query, key, value):
        compiling = torch.compiler.is_compiling()
        if layer not in self.layers or not (compiling or self.active(layer)):
            return key, value
        b = key.shape[0]
        if b % self.groups:
            raise ValueError(f"batch {b} is not divisible into {self.groups} reference groups")
        per = b // self.groups
        ref = torch.arange(b, device=key.device) // per * per + self.ref_index % per
        if not compiling:
            return key[ref], value[ref]
        # the step gate as a tensor (issue 20): one traced graph serves the steps inside and
        # outside [start_step, total_steps)
        on = (self.step_tensor >= self.start_step) & (self.step_tensor < self.total_steps)
        return torch.where(on, key[ref], key), torch.where(on, value[ref], value)


class ControlledAttnProcessor:
    """diffusers attention processor (SDPA) whose keys/values a controller may redirect."""

    def __init__(self, name: str, controller: AttentionController):
        self.name = name
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            seq = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states)
        key, value = self.controller.keys_values(self.name, query, key, value)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(key.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(value.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        # a division by 1.0 (every SD-1.5 layer) is a kernel launch for nothing
        if attn.rescale_output_factor != 1.0:
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


_SELF_ATTN_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _self_attention_modules(unet: nn.Module, regions) -> list[tuple[str, nn.Module]]:
    by_regions = _SELF_ATTN_CACHE.setdefault(unet, {})
    key = tuple(regions)
    if key not in by_regions:
        names = self_attention_layers(unet, 0, regions)
        by_regions[key] = [(n, unet.get_submodule(n[:-len(".processor")])) for n in names]
    return by_regions[key]


@contextmanager
def self_attention_control(unet: nn.Module, controller: AttentionController,
                           regions=("up",)) -> Iterator[AttentionController | None]:
    """Drive the self-attention layers of ``regions`` by ``controller``; restore them on exit.

    Only those layers' processors are swapped, which is cheap enough to do around every
    forward. A module without attention layers (a synthetic stand-in model) gets a no-op.
    """
    if not hasattr(unet, "up_blocks"):
        yield None
        return
    mods = _self_attention_modules(unet, regions)
    controller.place(next(unet.parameters()).device)
    old = [m.processor for _, m in mods]
    for name, m in mods:
        m.set_processor(ControlledAttnProcessor(name, controller))
    try:
        yield controller
    finally:
        for (_, m), proc in zip(mods, old):
            m.set_processor(proc)


def self_attention_names(unet: nn.Module, regions=("up",)) -> list[str]:
    """Processor names of the self-attention layers of ``regions`` (empty without a UNet)."""
    if not hasattr(unet, "up_blocks"):
        return []
    return [n for n, _ in _self_attention_modules(unet, regions)]


@contextmanager
def reference_attention(unet: nn.Module, regions=("up",)) -> Iterator[AttentionController | None]:
    """EasyDrag's reference (mutual self-)attention as a context manager.

    In a batch ``[edited, reference]`` the edited element's queries attend only to keys/values
    computed from the reference element's (normed) hidden states in every self-attention layer
    of ``regions`` (the decoder: ``up_blocks``); the reference runs ordinary self-attention, and
    a batch of one is plain attention (docs/methods.md, EasyDrag 7).
    """
    controller = ReferenceControl(self_attention_names(unet, regions), 0, 1 << 30, groups=1,
                                  ref_index=-1)
    with self_attention_control(unet, controller, regions) as c:
        yield c


class RecordKeysValues(AttentionController):
    """Ordinary attention that keeps each listed layer's keys and values (detached)."""

    def __init__(self, layers: list[str]):
        super().__init__()
        self.layers = set(layers)
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keys_values(self, layer, query, key, value):
        if layer in self.layers:
            self.kv[layer] = (key.detach(), value.detach())
        return key, value


class IndexedReference(AttentionController):
    """Element b's queries attend to the keys/values of batch element ``index[b]``.

    With ``index = [0, 2, 2]`` the batch ``[x, x, ref]`` holds a plain element, one reading
    ``ref`` (EasyDrag's reference attention) and ``ref`` itself: both of EasyDrag's guided
    predictions in one UNet call (:meth:`dragexp.core.sampling.ReferenceAttentionUNet.guided`).
    """

    def __init__(self, index):
        super().__init__()
        self.index = [int(i) for i in index]

    def keys_values(self, layer, query, key, value):
        if key.shape[0] != len(self.index):
            raise ValueError(f"batch {key.shape[0]} does not match the reference index "
                             f"{self.index}")
        idx = torch.tensor(self.index, device=key.device)
        return key[idx], value[idx]


class CachedReference(AttentionController):
    """Reference attention to recorded keys/values: what :func:`reference_attention` computes
    for the edited element, without running the reference element again.

    The reference branch of EasyDrag's drag is the frozen inverted latent, so its keys/values
    in each layer never change; recorded once (:class:`RecordKeysValues` on a batch-1 forward
    of that latent), they replace every element's own keys/values in the recorded layers.
    """

    def __init__(self, kv: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.kv = kv

    def keys_values(self, layer, query, key, value):
        ref = self.kv.get(layer)
        if ref is None:
            return key, value
        k, v = ref
        b = key.shape[0]
        return k.to(key.dtype).expand(b, *k.shape[1:]), v.to(value.dtype).expand(b, *v.shape[1:])


@contextmanager
def attention_control(unet: nn.Module, controller: AttentionController) -> Iterator[AttentionController]:
    """Install a controlled processor on every attention layer; restore the old ones on exit.

    ``unet.set_attn_processor`` needs a processor for every layer, so every layer gets one and
    the controller decides which of them deviate from ordinary attention.
    """
    old = dict(unet.attn_processors)
    controller.place(next(unet.parameters()).device)
    unet.set_attn_processor({name: ControlledAttnProcessor(name, controller) for name in old})
    try:
        yield controller
    finally:
        unet.set_attn_processor(old)
