"""Writing a bundle as a single-file checkpoint in the original LDM (CompVis) key layout.

This is the inverse of the conversion diffusers applies in ``from_single_file``
(``diffusers/loaders/single_file_utils.py``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``), written from the LDM module
structure so that community-style ``.safetensors`` files can be produced for any SD 1.5-topology
model, in particular the tiny test model, and the single-file loading path tested end to end.

LDM layout, SD 1.5 topology (L = ``layers_per_block``):

* UNet (``model.diffusion_model.``): ``input_blocks.0.0`` = ``conv_in``; down block ``b``, layer
  ``j`` is ``input_blocks.{1 + b(L+1) + j}`` with ``.0`` the ResBlock and ``.1`` the
  SpatialTransformer, and its downsampler is ``input_blocks.{1 + b(L+1) + L}.0.op``;
  ``middle_block.{0,1,2}`` = resnet, transformer, resnet; up block ``b`` (L+1 layers) layer ``j``
  is ``output_blocks.{b(L+1) + j}`` (``.0`` ResBlock, ``.1`` transformer) and its upsampler is the
  last module of its last layer (``.1.conv`` without attention, ``.2.conv`` with);
  ``time_embed.{0,2}``, ``out.{0,2}`` = norm and conv out.
* VAE (``first_stage_model.``): ``{encoder,decoder}.{down,up}.{i}.block.{j}`` resnets, the decoder's
  up levels numbered from the lowest resolution's opposite end (diffusers' up block ``i`` is LDM
  ``up.{n-1-i}``); ``mid.block_{1,2}``, ``mid.attn_1`` with 1x1-conv ``q, k, v, proj_out``.
* CLIP (``cond_stage_model.transformer.``): the transformers ``CLIPTextModel`` keys under
  ``text_model.``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from dragexp.models.bundle import ModelBundle

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _split_module(key: str, names: dict[str, str]) -> tuple[str, str] | None:
    """Splits ``key`` into (module, parameter) when its module is one of ``names``."""
    module, _, param = key.rpartition(".")
    return (module, param) if module in names else None


def unet_to_ldm(state_dict: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Renames a diffusers UNet2DConditionModel state dict to LDM ``UNetModel`` keys (no prefix).

    Transformer blocks keep their inner names: LDM's SpatialTransformer and diffusers'
    Transformer2DModel share them (``norm``, ``proj_in``, ``transformer_blocks.*``, ``proj_out``).

    Args:
        state_dict: the diffusers UNet's state dict.
        layers_per_block: the UNet's ``layers_per_block`` (down blocks have that many layers,
            up blocks one more).

    Returns:
        The same tensors under LDM keys.

    Raises:
        ValueError: a key with no LDM counterpart (e.g. class embeddings, LoRA layers).
    """
    down_stride = up_stride = layers_per_block + 1
    up_has_attention = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if fixed := _split_module(key, _UNET_FIXED):
            out[f"{_UNET_FIXED[fixed[0]]}.{fixed[1]}"] = tensor
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + block * down_stride + layer
            out[_ldm_layer("input_blocks", index, kind, rest)] = tensor
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            index = 1 + int(m[1]) * down_stride + layers_per_block
            out[f"input_blocks.{index}.0.op.{m[2]}"] = tensor
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            # Resnets and the transformer alternate: resnet 0, attention 0, resnet 1.
            index = 2 * int(m[2]) if m[1] == "resnets" else 2 * int(m[2]) + 1
            out[_ldm_layer("middle_block", index, m[1], m[3], nested=False)] = tensor
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            out[_ldm_layer("output_blocks", block * up_stride + layer, kind, rest)] = tensor
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            block = int(m[1])
            index = block * up_stride + layers_per_block
            position = 2 if block in up_has_attention else 1
            out[f"output_blocks.{index}.{position}.conv.{m[2]}"] = tensor
        else:
            raise ValueError(f"UNet key without an LDM counterpart: {key}")
    return out


def _ldm_layer(group: str, index: int, kind: str, rest: str, nested: bool = True) -> str:
    """LDM key of a resnet / transformer parameter inside ``group.index``.

    In ``input_blocks`` / ``output_blocks`` each layer is a sequential (``.0`` resnet, ``.1``
    transformer); in ``middle_block`` the index already addresses the module.
    """
    if kind == "resnets":
        module, _, param = rest.rpartition(".")
        rest = f"{_UNET_RESNET.get(module, module)}.{param}"
    if not nested:
        return f"{group}.{index}.{rest}"
    return f"{group}.{index}.{0 if kind == 'resnets' else 1}.{rest}"


def vae_to_ldm(state_dict: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    """Renames a diffusers AutoencoderKL state dict to LDM ``AutoencoderKL`` keys (no prefix).

    The mid-block attention's linear projections become 1x1 convolutions, their LDM form
    (diffusers squeezes them back when loading).

    Args:
        state_dict: the diffusers VAE's state dict.
        num_up_blocks: number of decoder up blocks (LDM numbers them in reverse).

    Returns:
        The same tensors under LDM keys.

    Raises:
        ValueError: a key with no LDM counterpart.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if fixed := _split_module(key, _VAE_FIXED):
            out[f"{_VAE_FIXED[fixed[0]]}.{fixed[1]}"] = tensor
        elif re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.\w+|(post_)?quant_conv\.\w+", key):
            out[key] = tensor
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"] = tensor
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            out[f"encoder.down.{m[1]}.downsample.conv.{m[2]}"] = tensor
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level = num_up_blocks - 1 - int(m[1])
            out[f"decoder.up.{level}.block.{m[2]}.{_vae_resnet(m[3])}"] = tensor
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            out[f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"] = tensor
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"] = tensor
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            if m[2] not in _VAE_ATTENTION:
                raise ValueError(f"VAE key without an LDM counterpart: {key}")
            if m[3] == "weight" and m[2] != "group_norm":
                tensor = tensor[:, :, None, None]
            out[f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"] = tensor
        else:
            raise ValueError(f"VAE key without an LDM counterpart: {key}")
    return out


def _vae_resnet(rest: str) -> str:
    """LDM names a VAE resnet's 1x1 shortcut ``nin_shortcut``; the other names agree."""
    return rest.replace("conv_shortcut", "nin_shortcut")


def clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Puts a transformers CLIPTextModel state dict under ``text_model.`` (no outer prefix).

    transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` in its keys); older versions
    have it. LDM's FrozenCLIPEmbedder wraps the unflattened model, so the prefix is always there.
    """
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state_dict.items()}


def bundle_to_ldm(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The bundle's UNet, VAE and text encoder as one LDM-layout state dict (CPU, contiguous)."""
    parts = (
        (UNET_PREFIX, unet_to_ldm(bundle.unet.state_dict(), bundle.unet.config.layers_per_block)),
        (VAE_PREFIX, vae_to_ldm(bundle.vae.state_dict(), len(bundle.vae.config.up_block_types))),
        (CLIP_PREFIX, clip_to_ldm(bundle.text_encoder.state_dict())),
    )
    # Cloned so that no two saved tensors share storage (safetensors refuses shared tensors).
    return {
        prefix + key: tensor.detach().to("cpu").contiguous().clone()
        for prefix, part in parts
        for key, tensor in part.items()
    }


def save_single_file(bundle: ModelBundle, path: str | os.PathLike) -> Path:
    """Writes the bundle as a community-style single-file checkpoint.

    ``.safetensors`` files hold the flat state dict; any other suffix (``.ckpt``) is written with
    ``torch.save`` as ``{"state_dict": ...}``, like the original LDM checkpoints.

    Args:
        bundle: models to save (any SD 1.5-topology bundle).
        path: target file.

    Returns:
        The file's path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = bundle_to_ldm(bundle)
    if path.suffix == ".safetensors":
        save_file(state_dict, str(path))
    else:
        torch.save({"state_dict": state_dict}, str(path))
    return path
