"""The fast path's ``lean_unet``: the same UNet function in fewer kernel launches.

An eager UNet call on a GPU is launch-bound (docs/benchmarks: 725 launches per SD-1.5 call,
about 40 us each); at SD-1.5's topology this removes 139 of them:

* every attention layer runs :class:`dragexp.core.attention.ControlledAttnProcessor` with no
  control (diffusers' ``AttnProcessor2_0`` arithmetic) and :class:`dragexp.core.projections.
  LeanProjections`: fused self-attention QKV (-32), cross-attention keys/values of a text
  embedding computed once (-32), no division by ``rescale_output_factor`` 1.0 (-32);
* every ``ResnetBlock2D`` runs :func:`lean_resnet_forward`: no division by
  ``output_scale_factor`` 1.0 (-22), and SiLU of the time embedding applied once, by a hook on
  ``unet.time_embedding``, instead of in each of the 22 blocks (-21).

Method code is untouched: controllers, feature taps (forward hooks on ``mid_block`` and
``up_blocks``, which still see the real module outputs) and LoRA adapters work as before; a
layer whose weights are trainable or wrapped by an active adapter is computed unfused
(:mod:`dragexp.core.projections`). The resnet part needs every consumer of the time embedding
to be a default ``ResnetBlock2D``; a UNet where that is not so keeps its resnets as they are.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..core.attention import AttentionController, ControlledAttnProcessor
from ..core.projections import LeanProjections

_BLOCKS_WITH_RESNET_ONLY_TEMB = {"CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
                                 "CrossAttnUpBlock2D", "UpBlock2D"}


def lean_resnet_forward(self, input_tensor: torch.Tensor, temb_act: torch.Tensor | None,
                        *args, **kwargs) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D.forward`` for the SD-1.5 configuration (``time_embedding_norm
    = "default"``, no up/down sampling inside), given the time embedding *after* its SiLU.

    Equal to the original up to the skipped no-op division (tests/test_lean_unet.py).
    """
    h = self.nonlinearity(self.norm1(input_tensor))
    h = self.conv1(h)
    if temb_act is not None:
        h = h + self.time_emb_proj(temb_act)[:, :, None, None]
    h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training
                                          else input_tensor)
    out = input_tensor + h
    return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


def _resnets(unet: nn.Module) -> list[nn.Module]:
    return [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]


def _resnets_can_share_activation(unet: nn.Module) -> bool:
    """Every consumer of the time embedding is a default ResnetBlock2D applying SiLU to it."""
    if not hasattr(unet, "time_embedding") or any(
            getattr(unet, a, None) is not None
            for a in ("class_embedding", "add_embedding", "time_embed_act")):
        return False
    blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    if any(type(b).__name__ not in _BLOCKS_WITH_RESNET_ONLY_TEMB for b in blocks):
        return False
    for r in _resnets(unet):
        if (r.time_embedding_norm != "default" or r.skip_time_act or r.upsample is not None
                or r.downsample is not None or r.time_emb_proj is None
                or type(r.nonlinearity) is not nn.SiLU):
            return False
    return True


def _silu_output(_module, _inputs, output):
    return torch.nn.functional.silu(output)


def set_lean(unet: nn.Module, on: bool) -> nn.Module:
    """Install (``on``) or remove the lean attention processors and resnet forwards; idempotent.

    Removing restores the attention processors the UNet had and the resnets' own forward.
    """
    if not hasattr(unet, "attn_processors"):
        return unet
    attn_modules = {n[:-len(".processor")]: unet.get_submodule(n[:-len(".processor")])
                    for n in unet.attn_processors}
    if on:
        if getattr(unet, "_dragexp_lean_saved", None) is None:
            unet._dragexp_lean_saved = dict(unet.attn_processors)
        control = AttentionController()
        procs = {}
        for name, m in attn_modules.items():
            if not hasattr(m, "_dragexp_lean"):
                m._dragexp_lean = LeanProjections()
            procs[f"{name}.processor"] = ControlledAttnProcessor(f"{name}.processor", control)
        unet.set_attn_processor(procs)
        if getattr(unet, "_dragexp_lean_handle", None) is None and \
                _resnets_can_share_activation(unet):
            for r in _resnets(unet):
                r.forward = types.MethodType(lean_resnet_forward, r)
            unet._dragexp_lean_handle = unet.time_embedding.register_forward_hook(_silu_output)
        return unet
    for m in attn_modules.values():
        if hasattr(m, "_dragexp_lean"):
            del m._dragexp_lean
    saved = getattr(unet, "_dragexp_lean_saved", None)
    if saved is not None:
        unet.set_attn_processor(saved)
        unet._dragexp_lean_saved = None
    handle = getattr(unet, "_dragexp_lean_handle", None)
    if handle is not None:
        handle.remove()
        unet._dragexp_lean_handle = None
        for r in _resnets(unet):
            if "forward" in r.__dict__:
                del r.forward
    return unet
