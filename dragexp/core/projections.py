"""Query/key/value projections of an attention layer, as the layer computes them or with
fewer kernel launches (the fast path's ``lean_unet``, :mod:`dragexp.performance.lean_unet`).

:func:`project_qkv` is what every processor of dragexp calls (:class:`dragexp.core.attention.
ControlledAttnProcessor`): ``attn.to_q`` / ``to_k`` / ``to_v`` on the layer's inputs. When the
fast path has prepared the layer (``attn._dragexp_lean`` holds a :class:`LeanProjections`),
the same values come from fewer launches:

* self-attention: one matrix product with the three weights concatenated (one launch instead
  of three); the three outputs are views of its result;
* cross-attention: keys and values of a text embedding seen before (the same tensor, or a
  view of it such as ``text.expand(b, -1, -1)``, unchanged since) are reused: the prompt of an
  edit is fixed, so after the first UNet call every step skips both products. A new
  embedding costs one product with the two weights concatenated; callers that build a text
  batch (classifier-free guidance) build it once per edit so that it is recognised.

A projection is only fused when its weights cannot change under it: a plain ``nn.Linear`` (or
a peft LoRA layer with its adapters off, e.g. inside :func:`dragexp.core.lora.merged_lora`)
whose weights need no gradient. Anything else (LoRA training, a trainable projection) runs
the layer's own modules. The concatenation is rebuilt when a weight's storage or version
changes; the cache holds the weights it was built from, so a freed weight's address cannot be
reused by a new one unnoticed.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

CROSS_CACHE_SIZE = 4   # distinct text embeddings kept per layer (prompt, negative, their CFG batch)


def _plain_linear(module: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` that computes ``module``'s output on its own, or None."""
    if type(module) is nn.Linear:
        return module
    base = getattr(module, "get_base_layer", None)
    if base is not None and getattr(module, "disable_adapters", False) and \
            not getattr(module, "merged", False) and type(base()) is nn.Linear:
        return base()
    return None


class _Fused:
    """Concatenated weights (and biases) of a few linear layers, valid while theirs are."""

    def __init__(self, layers: list[nn.Linear]):
        weights = [m.weight for m in layers]
        biases = [m.bias for m in layers]
        self.sources = weights + [b for b in biases if b is not None]
        self.key = self._key(self.sources)
        self._refs = [s.detach() for s in self.sources]   # keeps the storages alive
        with torch.no_grad():
            self.weight = torch.cat([w.detach() for w in weights])
            self.bias = None if any(b is None for b in biases) else \
                torch.cat([b.detach() for b in biases])

    @staticmethod
    def _key(tensors) -> tuple:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def valid_for(self, sources: list[torch.Tensor]) -> bool:
        return self._key(sources) == self.key


class LeanProjections:
    """Fused / cached projections for one ``diffusers`` ``Attention`` layer (see module doc)."""

    def __init__(self) -> None:
        self._fused: dict[str, _Fused] = {}
        self._cross: OrderedDict = OrderedDict()

    def _fused_for(self, kind: str, modules: list[nn.Module]) -> _Fused | None:
        layers = [_plain_linear(m) for m in modules]
        if any(m is None or m.weight.requires_grad or
               (m.bias is not None and m.bias.requires_grad) for m in layers):
            return None
        fused = self._fused.get(kind)
        if torch.compiler.is_compiling():
            # A traced step reads the concatenation its eager calls built (the weights are
            # frozen while a step is captured); storages cannot be compared inside a graph.
            return fused
        sources = [m.weight for m in layers] + [m.bias for m in layers if m.bias is not None]
        if fused is None or not fused.valid_for(sources):
            fused = self._fused[kind] = _Fused(layers)
            if kind == "kv":
                self._cross.clear()
        return fused

    @staticmethod
    def _linear(x: torch.Tensor, fused: _Fused) -> torch.Tensor:
        # Under autocast F.linear casts weight and input itself, like the layers would.
        return F.linear(x, fused.weight, fused.bias)

    def self_attention(self, attn, x: torch.Tensor):
        fused = self._fused_for("qkv", [attn.to_q, attn.to_k, attn.to_v])
        if fused is None:
            return None
        return self._linear(x, fused).chunk(3, dim=-1)

    def cross_keys_values(self, attn, context: torch.Tensor):
        fused = self._fused_for("kv", [attn.to_k, attn.to_v])
        if fused is None:
            return None
        if context.requires_grad or torch.compiler.is_compiling():
            return self._linear(context, fused).chunk(2, dim=-1)
        # Views of one embedding (``text.expand(b, -1, -1)`` per step) share its storage and
        # version counter, so they hit the entry of the first; the entry holds its tensor,
        # whose storage no other embedding can then occupy.
        key = (context.data_ptr(), tuple(context.shape), context.stride(), context._version,
               context.dtype, context.device, torch.is_autocast_enabled(context.device.type),
               torch.get_autocast_dtype(context.device.type))
        hit = self._cross.get(key)
        if hit is not None:
            self._cross.move_to_end(key)
            return hit[1]
        with torch.no_grad():
            kv = self._linear(context, fused).chunk(2, dim=-1)
        self._cross[key] = (context, kv)
        while len(self._cross) > CROSS_CACHE_SIZE:
            self._cross.popitem(last=False)
        return kv


def project_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query, key, value) of ``attn`` for ``hidden_states`` attending to
    ``encoder_hidden_states`` (None: self-attention), ``attn.norm_cross`` applied: what
    diffusers' ``AttnProcessor2_0`` computes, fused where :class:`LeanProjections` allows."""
    lean: LeanProjections | None = getattr(attn, "_dragexp_lean", None)
    if encoder_hidden_states is None:
        if lean is not None:
            qkv = lean.self_attention(attn, hidden_states)
            if qkv is not None:
                return qkv
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query = attn.to_q(hidden_states)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    if lean is not None:
        kv = lean.cross_keys_values(attn, encoder_hidden_states)
        if kv is not None:
            return query, kv[0], kv[1]
    return query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
