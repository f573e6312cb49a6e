"""The DiffEditor image prompt: IP-Adapter-style key/value projections in every cross-attention.

docs/methods.md, DragonDiffusion 3: a context longer than the text (77 tokens) carries
image-prompt tokens at its end; the last ``num_tokens`` of them are projected by the layer's own
``to_k_ip`` / ``to_v_ip`` and ``ip_scale * Attn(Q, K_ip, V_ip)`` is added to the text
cross-attention, only while the controller says so (sampling steps 10..19). Tokens before the
last ``num_tokens`` stay with the text (which is how the authors' appearance / paste modes, with
two images' tokens, use only the second image's as the prompt).

:class:`ImagePromptAttnProcessor` wraps the shared
:class:`~dragexp.core.attention.ControlledAttnProcessor` (text part) and adds the image term
through the layer's output projection (which is linear, so ``to_out(a + s b) = to_out(a) + s W b``).

Weights come from either a conformance UNet file (``<layer>.processor.to_k_ip.weight`` keys)
or an IP-Adapter checkpoint (``{"image_proj": ..., "ip_adapter": {"<n>.to_k_ip.weight": ...}}``,
``n`` counting every attention processor of the UNet in order). :class:`ImagePromptEncoder`
turns an image into the tokens: a CLIP vision model (a Hub id or local folder, like any model
source) and the checkpoint's resampler.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...core.attention import ControlledAttnProcessor, attention_control
from ...models.errors import ModelSourceError

__all__ = ["ImagePromptAdapter", "ImagePromptAttnProcessor", "dragon_attention",
           "ImagePromptEncoder", "TEXT_TOKENS"]

TEXT_TOKENS = 77


class ImagePromptAdapter(nn.Module):
    """Per cross-attention layer ``to_k_ip`` / ``to_v_ip`` (no bias), keyed by processor name.

    Args:
        weights: ``{processor name: (W_k, W_v)}`` with shapes ``[inner_dim, context_dim]``.
        scale: ``ip_scale`` (0.1 in the authors' app).
        num_tokens: image-prompt tokens at the end of the context (64).
        image_proj: optional module turning CLIP image features into the tokens.
    """

    def __init__(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 0.1,
                 num_tokens: int = 64, image_proj: nn.Module | None = None):
        super().__init__()
        self.names = list(weights)
        self.to_k_ip = nn.ModuleList()
        self.to_v_ip = nn.ModuleList()
        for wk, wv in weights.values():
            k = nn.Linear(wk.shape[1], wk.shape[0], bias=False)
            v = nn.Linear(wv.shape[1], wv.shape[0], bias=False)
            with torch.no_grad():
                k.weight.copy_(wk)
                v.weight.copy_(wv)
            self.to_k_ip.append(k)
            self.to_v_ip.append(v)
        self.scale = float(scale)
        self.num_tokens = int(num_tokens)
        self.image_proj = image_proj
        self.requires_grad_(False)

    def projections(self, name: str) -> tuple[nn.Linear, nn.Linear]:
        i = self.names.index(name)
        return self.to_k_ip[i], self.to_v_ip[i]

    @classmethod
    def from_processor_keys(cls, state: dict[str, torch.Tensor], **kwargs) -> "ImagePromptAdapter":
        """From ``<layer>.processor.to_k_ip.weight`` / ``to_v_ip`` keys (the conformance UNet
        files): the processor name is ``<layer>.processor``."""
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            m = re.fullmatch(r"(.+\.processor)\.(to_k_ip|to_v_ip)\.weight", key)
            if m:
                layers.setdefault(m.group(1), {})[m.group(2)] = value
        if not layers:
            raise ValueError("no '<layer>.processor.to_k_ip.weight' keys in the state dict")
        bad = [n for n, d in layers.items() if set(d) != {"to_k_ip", "to_v_ip"}]
        if bad:
            raise ValueError(f"image-prompt layers without both to_k_ip and to_v_ip: {bad}")
        return cls({n: (d["to_k_ip"], d["to_v_ip"]) for n, d in layers.items()}, **kwargs)

    @classmethod
    def from_ip_adapter(cls, unet: nn.Module, checkpoint: dict, **kwargs) -> "ImagePromptAdapter":
        """From an IP-Adapter checkpoint (the authors' ``ip_sd15_64.bin`` layout): ``ip_adapter``
        keys ``<n>.to_k_ip.weight`` number every attention processor of the UNet in order
        (only cross-attention ones have weights); ``image_proj`` is the resampler."""
        names = list(unet.attn_processors.keys())
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in checkpoint["ip_adapter"].items():
            m = re.fullmatch(r"(\d+)\.(to_k_ip|to_v_ip)\.weight", key)
            if m is None:
                continue
            n = int(m.group(1))
            if n >= len(names):
                raise ValueError(f"IP-Adapter checkpoint key {key!r} numbers processor {n}, but the "
                                 f"UNet has {len(names)}")
            layers.setdefault(names[n], {})[m.group(2)] = value
        proj = None
        if "image_proj" in checkpoint:
            proj = unet._convert_ip_adapter_image_proj_to_diffusers(checkpoint["image_proj"],
                                                                    low_cpu_mem_usage=False)
        return cls({n: (d["to_k_ip"], d["to_v_ip"]) for n, d in layers.items()},
                   image_proj=proj, **kwargs)


class ImagePromptAttnProcessor:
    """Cross-attention with image-prompt tokens: the text part by the shared controlled
    processor, plus ``scale * Attn(Q, K_ip, V_ip)`` when ``controller.ip_active``."""

    def __init__(self, name: str, controller, adapter: ImagePromptAdapter,
                 inner: ControlledAttnProcessor | None = None, text_tokens: int = TEXT_TOKENS):
        self.name = name
        self.controller = controller
        self.adapter = adapter
        self.inner = inner or ControlledAttnProcessor(name, controller)
        self.text_tokens = int(text_tokens)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        ip = None
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] > self.text_tokens:
            end = encoder_hidden_states.shape[1] - self.adapter.num_tokens
            encoder_hidden_states, ip = encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if ip is None or not self.controller.ip_active:
            return out
        if hidden_states.ndim != 3 or attn.residual_connection or attn.rescale_output_factor != 1:
            raise NotImplementedError(f"{self.name}: image prompts need a plain cross-attention "
                                      "layer (3-D input, no residual inside, no rescale)")
        to_k_ip, to_v_ip = self.adapter.projections(self.name)
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        k, v = to_k_ip(ip), to_v_ip(ip)
        d = k.shape[-1] // attn.heads
        q = q.view(b, -1, attn.heads, d).transpose(1, 2)
        k = k.view(b, -1, attn.heads, d).transpose(1, 2)
        v = v.view(b, -1, attn.heads, d).transpose(1, 2)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * d)
        return out + self.adapter.scale * F.linear(h.to(q.dtype), attn.to_out[0].weight)


@contextmanager
def dragon_attention(unet: nn.Module, controller, adapter: ImagePromptAdapter | None = None
                     ) -> Iterator:
    """Every attention layer gets the shared controlled processor (the controller decides the
    decoder self-attention's keys/values); cross-attention layers named by ``adapter`` also get
    the image prompt. The UNet's own processors come back on exit."""
    with attention_control(unet, controller):
        if adapter is not None:
            procs = dict(unet.attn_processors)
            missing = [n for n in adapter.names if n not in procs]
            if missing:
                raise ValueError(f"image-prompt weights for layers this UNet does not have: {missing[:3]}")
            for n in adapter.names:
                procs[n] = ImagePromptAttnProcessor(n, controller, adapter, procs[n])
            unet.set_attn_processor(procs)
        yield controller


class ImagePromptEncoder:
    """Image -> (tokens, tokens of the all-zero image), as the authors' ``get_image_embeds``.

    The image is resized to 256 x 256 (PIL), preprocessed by CLIP's image processor, encoded by a
    CLIP vision model (penultimate hidden states) and resampled to ``num_tokens`` tokens by the
    adapter's ``image_proj``.

    Args:
        encoder: Hub id or local folder of a ``CLIPVisionModelWithProjection`` (the authors use
            ``h94/IP-Adapter``, subfolder ``models/image_encoder``).
        subfolder: subfolder inside ``encoder``.
        local_files_only: never contact the Hub (None: follow ``HF_HUB_OFFLINE``).
    """

    def __init__(self, encoder: str, subfolder: str | None = None, device="cpu",
                 dtype=torch.float32, local_files_only: bool | None = None):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from ...models.pretrained import (_LOAD_ERRORS, _first_line, _hub_error, _looks_like_path,
                                          offline_reason)

        if local_files_only is None:
            local_files_only = offline_reason() is not None
        path = Path(str(encoder)).expanduser()
        kwargs = dict(subfolder=subfolder) if subfolder else {}
        try:
            if path.is_dir():
                self.model = CLIPVisionModelWithProjection.from_pretrained(str(path), dtype=dtype, **kwargs)
            elif _looks_like_path(str(encoder)):
                raise ModelSourceError(f"image encoder folder not found: {encoder} (method.image_prompt."
                                       "encoder must be a Hub id or a folder with a CLIP vision model)")
            else:
                self.model = CLIPVisionModelWithProjection.from_pretrained(
                    str(encoder), dtype=dtype, local_files_only=local_files_only, **kwargs)
        except _LOAD_ERRORS as err:
            if path.is_dir():
                raise ModelSourceError(f"could not load a CLIP vision model from {path}"
                                       f"{'/' + subfolder if subfolder else ''}: {_first_line(err)}") from err
            raise _hub_error(str(encoder), err, "image encoder",
                             "set method.image_prompt.encoder=/path/to/a/clip/vision/folder") from err
        self.processor = CLIPImageProcessor()
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def __call__(self, image: np.ndarray, adapter: ImagePromptAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        if adapter.image_proj is None:
            raise ValueError("the image-prompt checkpoint has no 'image_proj' (resampler) weights")
        pil = Image.fromarray(image).resize((256, 256))
        pixels = self.processor(images=[pil], return_tensors="pt").pixel_values.to(self.device, self.dtype)
        proj = adapter.image_proj.to(self.device, self.dtype)
        cond = proj(self.model(pixels, output_hidden_states=True).hidden_states[-2])
        uncond = proj(self.model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2])
        return cond, uncond


def load_ip_checkpoint(source: str, local_files_only: bool | None = None) -> dict:
    """An IP-Adapter checkpoint from a local ``.bin`` / ``.safetensors`` file or a Hub file given
    as ``<repo id>:<path in repo>`` (the authors': ``Adapter/DragonDiffusion:model/ip_sd15_64.bin``)."""
    from ...models.pretrained import _LOAD_ERRORS, _hub_error, offline_reason

    path = Path(str(source)).expanduser()
    if not path.is_file():
        if ":" not in str(source):
            raise ModelSourceError(f"image-prompt checkpoint not found: {source} (method.image_prompt."
                                   "adapter must be a local .bin/.safetensors file or "
                                   "'<hub repo id>:<file path>')")
        repo, filename = str(source).split(":", 1)
        import huggingface_hub

        if local_files_only is None:
            local_files_only = offline_reason() is not None
        try:
            path = Path(huggingface_hub.hf_hub_download(repo, filename, local_files_only=local_files_only))
        except _LOAD_ERRORS as err:
            raise _hub_error(repo, err, f"image-prompt checkpoint {filename} of",
                             "set method.image_prompt.adapter=/path/to/ip_sd15_64.bin") from err
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        out: dict = {}
        for k, v in flat.items():
            head, _, rest = k.partition(".")
            out.setdefault(head, {})[rest] = v
        return out
    return torch.load(str(path), map_location="cpu", weights_only=True)
