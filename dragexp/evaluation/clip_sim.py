"""CLIP image-image similarity (docs/evaluation.md section 4).

The reference loads OpenAI's ``clip.load("ViT-B/32")`` and, for the source PIL image and the
*resized* edited PIL image, applies CLIP's own preprocessing (``Resize(224, BICUBIC)`` of the
shorter side, ``CenterCrop(224)``, ``ToTensor``, normalise with CLIP's mean/std), then
``encode_image``, L2-normalises and takes the dot product; the score is the mean over images.

Models are built with open_clip, which reads OpenAI's layout directly
(``build_model_from_openai_state_dict``, QuickGELU): OpenAI's ViT-B/32 file, open_clip's
``pretrained='openai'`` weights from the Hugging Face cache, an OpenAI-layout state dict file
(the conformance cases' ``clip.safetensors``), or a tiny random model for tests. We compute in
float32; on CUDA the reference's ``clip.load`` kept fp16 weights (a difference of about 1e-3 in
the similarity).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..models.errors import ModelSourceError

__all__ = ["CLIP_MEAN", "CLIP_STD", "clip_preprocess", "clip_embedding", "clip_similarity",
           "build_clip"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(image: np.ndarray | Image.Image, n_px: int = 224) -> torch.Tensor:
    """CLIP's ``_transform(224)`` on a PIL image -> float32 ``[1, 3, 224, 224]``."""
    from torchvision import transforms as T

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    tf = T.Compose([T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC),
                    T.CenterCrop(n_px), T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(),
                    T.Normalize(CLIP_MEAN, CLIP_STD)])
    return tf(pil)[None]


def clip_embedding(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``encode_image`` then L2 normalisation: ``[1, E]`` float32."""
    device = next(model.parameters()).device
    with torch.no_grad():
        f = model.encode_image(pixels.to(device)).float()
    return (f / f.norm(dim=-1, keepdim=True)).cpu()


def clip_similarity(model: torch.nn.Module, source: np.ndarray, edited_resized: np.ndarray,
                    record: dict | None = None) -> torch.Tensor:
    """Cosine of the CLIP image embeddings of the source and the resized edited image.

    Returns:
        float32 scalar tensor (the value the script appends to ``all_clip_sim``).
    """
    n_px = _image_size(model)
    ps, pd = clip_preprocess(source, n_px), clip_preprocess(edited_resized, n_px)
    fs, fd = clip_embedding(model, ps), clip_embedding(model, pd)
    if record is not None:
        record.update(input_source=ps, input_edited=pd, feat_source=fs, feat_edited=fd)
    return (fs * fd).sum()


def _image_size(model) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _finish(model, description: str):
    model = model.float().eval().requires_grad_(False)
    model.description = description
    return model


def _from_state_dict(sd: dict) -> torch.nn.Module:
    from open_clip.model import build_model_from_openai_state_dict

    # OpenAI's own build_model converts to fp16 and clip.load casts back to float32 on the CPU.
    return build_model_from_openai_state_dict(dict(sd), cast_dtype=None)


def build_clip(source: str = "openai", path: str | None = None, seed: int = 0,
               cache_dir: str | None = None) -> torch.nn.Module:
    """A CLIP model in OpenAI's ViT-B/32 layout, float32, eval mode, frozen, on the CPU.

    Args:
        source: ``"openai"``: OpenAI's ViT-B/32 (``path`` if given, else OpenAI's own cache
            ``~/.cache/clip/ViT-B-32.pt``, else open_clip's ``pretrained='openai'`` through the
            Hugging Face cache); ``"file"``: ``path`` is an OpenAI checkpoint (``.pt``, JIT
            archive or state dict) or an OpenAI-layout ``.safetensors`` state dict; ``"tiny"``:
            a random ViT/32 at 224 of width 64 (tests; numbers are meaningless).
        path: the weights file for ``"openai"`` / ``"file"``.
        seed: seed of the tiny model.
        cache_dir: open_clip's download cache for ``"openai"``.

    Raises:
        ModelSourceError: the weights cannot be found (offline), saying what to do.
    """
    if source == "tiny":
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = CLIP(32, CLIPVisionCfg(layers=2, width=64, patch_size=32, image_size=224),
                         CLIPTextCfg(context_length=77, vocab_size=64, width=64, heads=1, layers=1),
                         quick_gelu=True)
        return _finish(model, f"CLIP tiny ViT/32 random(seed={seed})")
    if source == "file" or (source == "openai" and path):
        p = Path(str(path)).expanduser()
        if not p.is_file():
            raise ModelSourceError(f"CLIP weights file not found: {path!r}")
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            model = _from_state_dict({k: v for k, v in load_file(str(p)).items()})
        else:
            from open_clip.openai import load_openai_model

            model = load_openai_model(str(p), precision="fp32", device="cpu")
        return _finish(model, f"CLIP({p.name})")
    if source != "openai":
        raise ValueError(f"CLIP source must be 'openai', 'file' or 'tiny', got {source!r}")
    openai_cache = Path(os.path.expanduser("~/.cache/clip/ViT-B-32.pt"))
    if openai_cache.is_file():
        from open_clip.openai import load_openai_model

        return _finish(load_openai_model(str(openai_cache), precision="fp32", device="cpu"),
                       "CLIP ViT-B/32 (OpenAI)")
    import open_clip

    try:
        model = open_clip.create_model("ViT-B-32", pretrained="openai", cache_dir=cache_dir,
                                       require_pretrained=True)
    except Exception as err:  # noqa: BLE001 - any download / cache failure
        raise ModelSourceError(
            "CLIP: OpenAI ViT-B/32 weights are not available offline ("
            f"{type(err).__name__}); put OpenAI's ViT-B-32.pt at {openai_cache} or set "
            "eval.clip.path=/path/to/ViT-B-32.pt, or fill the Hugging Face cache with "
            "`hf download timm/vit_base_patch32_clip_224.openai` on a machine with network; "
            "eval/clip=tiny runs a smoke test") from err
    return _finish(model, "CLIP ViT-B/32 (OpenAI, open_clip)")
