"""LoRA on the UNet's attention projections: add, read, write, save and load (peft + diffusers).

DragDiffusion's identity-preserving LoRA (docs/methods.md, DragDiffusion 1) puts a rank-``r``
LoRA on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of every attention module, with
``lora_alpha = r`` (scale 1, so the layer computes ``W x + b + B A x``), ``A ~ N(0, 1/r^2)`` and
``B = 0`` (peft's ``"gaussian"`` init). The LoRA weights stay float32 whatever the dtype of the
base weights.

Files are written in the current diffusers LoRA format (what
``StableDiffusionPipeline.save_lora_weights`` writes from ``convert_state_dict_to_diffusers``:
keys ``unet.<module>.lora.down.weight`` / ``.lora.up.weight`` plus the adapter config as metadata),
so ``StableDiffusionPipeline.load_lora_weights(folder)`` loads them. :func:`load_lora` also reads
the files the DragDiffusion reference wrote (keys ``unet.unet.<module>.lora.{down,up}.weight``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"


def has_lora(unet: nn.Module) -> bool:
    """Whether ``unet`` holds a peft adapter."""
    return bool(getattr(unet, "peft_config", None))


def remove_lora(unet: nn.Module) -> None:
    """Delete every adapter of ``unet`` (no-op without one): the base weights are untouched."""
    if has_lora(unet):
        unet.delete_adapters(list(unet.peft_config.keys()))


def _adapter_name(unet: nn.Module) -> str:
    names = list(getattr(unet, "peft_config", {}).keys())
    if len(names) != 1:
        raise ValueError(f"expected exactly one LoRA adapter on the UNet, found {names}")
    return names[0]


def lora_named_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters of ``unet``'s adapter, named as in :func:`lora_state_dict`."""
    name = _adapter_name(unet)
    tag = f".{name}."
    return {n.replace(tag, "."): p for n, p in unet.named_parameters()
            if (".lora_A" + tag in n or ".lora_B" + tag in n)}


def add_lora(unet: nn.Module, rank: int = 16, init: str | bool = "gaussian") -> list[nn.Parameter]:
    """Add a fresh LoRA adapter to ``unet`` and make it the only trainable part.

    Any adapter already on the UNet is removed first, so a UNet carries at most one LoRA (the one
    of the image being edited).

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        rank: LoRA rank ``r``; ``lora_alpha = r`` so the LoRA output is added with scale 1.
        init: peft's ``init_lora_weights`` (``"gaussian"``: ``A ~ N(0, 1/r^2)``, ``B = 0``).

    Returns:
        The trainable LoRA parameters (float32, ``requires_grad=True``).
    """
    from peft import LoraConfig

    remove_lora(unet)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=init,
                                target_modules=list(LORA_TARGETS)), adapter_name=ADAPTER_NAME)
    return _make_trainable(unet)


def _make_trainable(unet: nn.Module) -> list[nn.Parameter]:
    params = list(lora_named_parameters(unet).values())
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of ``unet`` (in module order)."""
    return list(lora_named_parameters(unet).values())


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft naming (``<module>.lora_A.weight`` / ``.lora_B.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=_adapter_name(unet))


def set_lora_state(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load peft-named weights into ``unet``'s adapter; every LoRA weight must be given."""
    from peft.utils import set_peft_model_state_dict

    current = lora_named_parameters(unet)
    missing = sorted(set(current) - set(state))
    extra = sorted(set(state) - set(current))
    if missing or extra:
        raise KeyError(f"LoRA state does not match the adapter: missing {missing[:3]} "
                       f"({len(missing)}), unexpected {extra[:3]} ({len(extra)})")
    set_peft_model_state_dict(unet, state, adapter_name=_adapter_name(unet))


def save_lora(unet: nn.Module, folder: str | os.PathLike) -> Path:
    """Write the adapter to ``folder/pytorch_lora_weights.safetensors`` in diffusers' format.

    The file is first written under a temporary name in ``folder`` and then renamed, so a reader
    never sees a partial file.

    Returns:
        Path of the written file.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous()
             for k, v in convert_state_dict_to_diffusers(lora_state_dict(unet)).items()}
    config = unet.peft_config[_adapter_name(unet)].to_dict()
    target = folder / LORA_WEIGHT_NAME
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state,
                                                  unet_lora_adapter_metadata=config,
                                                  weight_name=LORA_WEIGHT_NAME)
        os.replace(Path(tmp) / LORA_WEIGHT_NAME, target)
    return target


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A LoRA file's tensors (keys ``unet.<module>...``) and its adapter metadata, if any.

    The DragDiffusion reference's doubled prefix ``unet.unet.`` is reduced to ``unet.``
    (docs/methods.md, DragDiffusion 1, "Saved file").
    """
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {("unet." + k[len("unet.unet."):]) if k.startswith("unet.unet.") else k: v
             for k, v in state.items()}
    meta = header.get(LORA_ADAPTER_METADATA_KEY)
    return state, (json.loads(meta) if meta else None)


def load_lora(unet: nn.Module, path: str | os.PathLike) -> None:
    """Load a LoRA file (ours, or the DragDiffusion reference's) into ``unet`` as its only adapter.

    The loaded LoRA weights are float32 and frozen (``requires_grad=False``).

    Args:
        unet: the UNet; any adapter it holds is removed first.
        path: the ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors``.
    """
    state, meta = read_lora_file(path)
    if not any(k.startswith("unet.") for k in state):
        raise ValueError(f"{path}: no UNet LoRA weights (keys starting with 'unet.')")
    remove_lora(unet)
    unet.load_lora_adapter(state, prefix="unet", adapter_name=ADAPTER_NAME, metadata=meta)
    for p in lora_parameters(unet):  # float32 like a trained one; frozen (loaded for inference)
        p.data = p.data.float()
        p.requires_grad_(False)


@contextmanager
def merged_lora(unet: nn.Module):
    """Inside the block every LoRA layer computes ``(W + s B A) x + b`` with one matrix product.

    The adapter's weights are folded into a new base weight per layer, ``W' = W + s B A``
    (summed in float32, stored in ``W``'s dtype), and the adapters are switched off; on exit the
    original ``W`` tensors are put back untouched (no ``W' - s B A`` subtraction, so low-precision
    base weights do not drift from one sample to the next) and the adapter is on again, frozen
    or trainable as before. Same function as the adapter, up to rounding (in fp16/bf16 weights
    ``s B A`` is rounded to ``W``'s precision); a third of the kernel launches of a LoRA UNet
    forward (``dragexp.performance.speed``, ``merge_lora``). Without an adapter the block runs as it is.
    """
    if not has_lora(unet):
        yield unet
        return
    from peft.tuners.lora import LoraLayer

    name = _adapter_name(unet)
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
    grads = {p: p.requires_grad for p in lora_parameters(unet)}
    originals = []
    with torch.no_grad():
        for layer in layers:
            base = layer.get_base_layer()
            w = base.weight.data
            delta = layer.get_delta_weight(name).to(w.device, torch.float32)
            originals.append((base, w))
            base.weight.data = (w.float() + delta.view_as(w)).to(w.dtype)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for base, w in originals:
            base.weight.data = w
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in grads.items():   # peft's enable_adapters makes the adapter trainable
            p.requires_grad_(flag)


def lora_cache_key(image: np.ndarray, prompt: str, model_source: str, settings: dict) -> str:
    """A key naming one LoRA: sha256 over the image (bytes, shape, dtype), prompt, model, settings.

    A LoRA trained for the same image, prompt, model and training settings is reused.
    """
    image = np.ascontiguousarray(image)
    h = hashlib.sha256()
    h.update(b"dragexp-lora-v1\0")
    h.update(json.dumps([list(image.shape), str(image.dtype)]).encode())
    h.update(image.tobytes())
    h.update(b"\0" + prompt.encode() + b"\0" + str(model_source).encode() + b"\0")
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()
