"""DIFT features (Tang et al. 2023) as DragBench's Mean Distance computes them.

docs/evaluation.md section 2, step 3 (``SDFeaturizer.forward(img, prompt, t=261,
up_ft_index=1, ensemble_size=8)``):

1. the image (``[1, 3, H, W]`` in [-1, 1], the image's own size) is repeated into a batch of
   ``ensemble_size`` (here: encoded once, its posterior broadcast; the encoder is deterministic
   and per-sample, so the 8 posteriors are the same);
2. VAE encode; the latent is a *sample* of the posterior, ``mean + std * eps`` with an
   independent ``eps`` per copy, times the VAE scaling factor (0.18215);
3. ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise`` at the fixed timestep ``t`` (DDIM
   ``add_noise``, SD's scaled-linear schedule in float32), independent noise per copy;
4. the prompt's text embedding (no classifier-free guidance) repeated to the batch;
5. the UNet runs at ``t`` and stops after ``up_blocks[up_ft_index]``: the feature is that
   block's *output* (after its upsampler); odd sizes go through diffusers' own
   ``forward_upsample_size`` path because the real UNet forward runs;
6. the ensemble mean, ``[1, C, h, w]``.

The model is any :class:`~dragexp.models.ModelBundle` (Stable Diffusion 2.1 from the Hub or a
local folder for published numbers; :func:`build_tiny_dift` for tests; the stored tiny models
of the conformance cases, :func:`load_dift_case_models`). The two random draws of every call
come from a :class:`NoiseSource`, so they can be seeded per sample, drawn from the global RNG
as the authors did, or injected (conformance).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..core.features import feature_module
from ..core.schedule import sd_alphas_cumprod
from ..models.bundle import ModelBundle
from ..models.tiny import sd_vae_config
from .resize import to_signed_unit

__all__ = [
    "DIFT_SD21_ID", "DiftFeaturizer", "ExactPositionFeaturizer", "NoiseSource", "SeededNoise",
    "GlobalNoise", "StoredNoise", "dift_features", "build_tiny_dift", "build_sd21_random",
    "load_dift", "load_dift_case_models", "positional_features",
]

DIFT_SD21_ID = "stabilityai/stable-diffusion-2-1"
"""The model DragBench's Mean Distance uses (``dift_sd.py``: ``SDFeaturizer(sd_id=...)``)."""


class NoiseSource(Protocol):
    """Supplies the standard-normal draws of one featurizer call, in the reference's order:
    first the VAE posterior ``eps``, then the ``add_noise`` noise (both ``[E, 4, h, w]``)."""

    def draw(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor: ...


@dataclass
class SeededNoise:
    """Draws from a private CPU generator (then moved to ``device``), so the values do not
    depend on the device, on other samples or on the order in which samples are visited."""

    seed: int
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.generator = torch.Generator("cpu").manual_seed(int(self.seed))

    def draw(self, shape, device):
        return torch.randn(tuple(shape), generator=self.generator).to(device)


class GlobalNoise:
    """Draws from torch's global RNG on ``device``, as the reference does (``randn_tensor``
    with no generator, ``torch.randn_like``): the authors' order-dependent behaviour."""

    def draw(self, shape, device):
        return torch.randn(tuple(shape), device=device)


@dataclass
class StoredNoise:
    """Replays recorded draws (the conformance cases store them as int8 ``q``, value ``q/32``)."""

    tensors: list[torch.Tensor]

    def draw(self, shape, device):
        if not self.tensors:
            raise RuntimeError("StoredNoise: more draws requested than were stored")
        t = self.tensors.pop(0)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"StoredNoise: stored draw has shape {tuple(t.shape)}, the featurizer "
                             f"needs {tuple(shape)}")
        return t.float().to(device)


class _Stop(Exception):
    """Raised by a forward hook to end the UNet forward after the feature block."""


def dift_features(models: ModelBundle, image: torch.Tensor, prompt_embeds: torch.Tensor,
                  noise: NoiseSource, t: int = 261, up_ft_index: int = 1, ensemble_size: int = 8,
                  alphas_cumprod: torch.Tensor | None = None,
                  record: dict | None = None) -> torch.Tensor:
    """The DIFT feature map of one image (docs/evaluation.md section 2, step 3).

    Args:
        models: UNet + VAE (the text encoder is not used here).
        image: ``[1, 3, H, W]`` float in [-1, 1] at the image's own size.
        prompt_embeds: ``[1, L, D]`` text embedding of the sample's prompt.
        noise: the source of the two random draws (VAE ``eps``, then ``add_noise`` noise).
        t: diffusion timestep (261).
        up_ft_index: the feature is the output of ``unet.up_blocks[up_ft_index]`` (1).
        ensemble_size: noisy copies averaged (8).
        alphas_cumprod: the training schedule's alpha-bar (default SD's scaled-linear, float32).
        record: if given, filled with the intermediates (``vae_mean``, ``vae_std``,
            ``latents``, ``latents_noisy``, ``sqrt_alpha_prod``, ``sqrt_one_minus_alpha_prod``,
            ``up_ft_members``).

    Returns:
        ``[1, C, h, w]`` float32 ensemble-mean feature map (``h, w`` about ``H/16, W/16``).
    """
    unet, vae = models.unet, models.vae
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    ac = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    with torch.no_grad():
        # The reference encodes the image repeated 8 times; the encoder is deterministic and
        # per-sample (GroupNorm), so its 8 posteriors are the same: encode once, broadcast.
        post = vae.encode(image.to(device=device, dtype=vae.dtype)).latent_dist
        shape = (ensemble_size, *post.mean.shape[1:])
        eps = noise.draw(shape, device).to(post.mean.dtype)
        latents = (post.mean + post.std * eps) * float(vae.config.scaling_factor)
        # DDIMScheduler.add_noise in float32 (scheduler tensors are float32, cast to the latent's)
        a = ac[t].to(device)
        sqrt_a = a ** 0.5
        sqrt_1ma = (1 - a) ** 0.5
        z = noise.draw(latents.shape, device).to(latents.dtype)
        noisy = sqrt_a.to(latents.dtype) * latents + sqrt_1ma.to(latents.dtype) * z
        text = prompt_embeds.to(device=device, dtype=dtype).repeat(ensemble_size, 1, 1)
        block = feature_module(unet, up_ft_index + 1)  # FeatureTap index k = up_blocks[k-1]
        captured: list[torch.Tensor] = []

        def hook(_m, _i, out):
            captured.append(out[0] if isinstance(out, tuple) else out)
            raise _Stop

        handle = block.register_forward_hook(hook)
        try:
            unet(noisy.to(dtype), torch.tensor(t, dtype=torch.long, device=device),
                 encoder_hidden_states=text, return_dict=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        members = captured[0].float()
        ft = members.mean(0, keepdim=True)
    if record is not None:
        record.update(vae_mean=post.mean[:1].float(), vae_std=post.std[:1].float(),
                      latents=latents.float(), latents_noisy=noisy.float(),
                      sqrt_alpha_prod=sqrt_a.reshape(1).float(),
                      sqrt_one_minus_alpha_prod=sqrt_1ma.reshape(1).float(),
                      up_ft_members=members)
    return ft


class DiftFeaturizer:
    """DIFT on a model bundle: ``featurizer(image_u8, prompt, noise) -> [1, C, h, w]``.

    Args:
        models: a Stable Diffusion bundle (SD 2.1 for published numbers).
        t, up_ft_index, ensemble_size: the protocol's 261, 1, 8.
        attention_slicing: ``"auto"`` runs every UNet attention with diffusers'
            ``SlicedAttnProcessor`` (``heads // 2`` slices), as the reference's
            ``enable_attention_slicing()`` does (same maths, same rounding as the recorded
            cases); ``None`` keeps the model's default processors (faster on GPUs).
        device: where the models run (``None``: where they are).
    """

    kind = "dift"

    def __init__(self, models: ModelBundle, t: int = 261, up_ft_index: int = 1,
                 ensemble_size: int = 8, attention_slicing: str | int | None = "auto",
                 device: str | torch.device | None = None):
        if device is not None:
            models = models.to(torch.device(device))
        self.models = models
        self.t, self.up_ft_index, self.ensemble_size = int(t), int(up_ft_index), int(ensemble_size)
        if attention_slicing is not None:
            models.unet.set_attention_slice(attention_slicing)
        self.attention_slicing = attention_slicing
        self._prompts: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.models.device

    @property
    def description(self) -> str:
        return (f"DIFT({self.models.source}, t={self.t}, up_blocks[{self.up_ft_index}], "
                f"ensemble={self.ensemble_size})")

    def prompt_embeds(self, prompt: str | torch.Tensor) -> torch.Tensor:
        """The text encoder's last hidden state (``_encode_prompt`` without CFG), memoised."""
        if isinstance(prompt, torch.Tensor):
            return prompt
        if prompt not in self._prompts:
            self._prompts[prompt] = self.models.encode_prompt(prompt).float()
        return self._prompts[prompt]

    def __call__(self, image: np.ndarray, prompt: str | torch.Tensor, noise: NoiseSource,
                 record: dict | None = None) -> torch.Tensor:
        return dift_features(self.models, to_signed_unit(image), self.prompt_embeds(prompt),
                             noise, self.t, self.up_ft_index, self.ensemble_size, record=record)


@functools.lru_cache(maxsize=8)
def _positional(h: int, w: int) -> torch.Tensor:
    r = torch.arange(h, dtype=torch.float64) * (np.pi / h)
    c = torch.arange(w, dtype=torch.float64) * (np.pi / w)
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    return torch.stack([rr.cos(), rr.sin(), cc.cos(), cc.sin()])[None].float()


def positional_features(h: int, w: int) -> torch.Tensor:
    """``[1, 4, h, w]`` features that encode the pixel position exactly.

    ``(cos, sin)`` of ``pi * row / h`` and of ``pi * col / w``: the cosine similarity of two
    such vectors is ``(cos(d_row) + cos(d_col)) / 2`` in angle units, 1 only at the same pixel
    (angles span less than pi, so no wrap-around), and strictly smaller elsewhere in float32.
    """
    return _positional(int(h), int(w)).clone()


class ExactPositionFeaturizer:
    """A diagnostic stand-in for DIFT whose features encode position exactly, whatever the image.

    With it, every handle matches itself, so the Mean Distance of any edit equals the mean
    handle-target distance ("do nothing" gives about 52 px on DragBench). It checks the matching,
    the coordinate conventions and the pooling, not the edit. Returned at full image size, so
    the bilinear upsampling of the protocol is the identity.
    """

    kind = "exact_position"
    device = torch.device("cpu")
    description = "exact-position features (diagnostic, not DIFT)"

    def __call__(self, image: np.ndarray, prompt, noise=None, record=None) -> torch.Tensor:
        return positional_features(int(image.shape[0]), int(image.shape[1]))


# --------------------------------------------------------------------------------------------
# Model sources (anything that gives a ModelBundle is a DIFT model source; these are the extra
# ones the evaluation needs: an SD-2.1-topology tiny model, SD-2.1's architecture with random
# weights for timing, and the stored tiny models of the dragbench_eval conformance cases).

_SD21_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD21_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def _sd21_unet_config(width: tuple[int, ...], heads, cross_attention_dim: int,
                      norm_num_groups: int) -> dict:
    return dict(sample_size=96, in_channels=4, out_channels=4, down_block_types=_SD21_DOWN,
                up_block_types=_SD21_UP, block_out_channels=width, layers_per_block=2,
                attention_head_dim=heads, cross_attention_dim=cross_attention_dim,
                use_linear_projection=True, upcast_attention=True,
                norm_num_groups=norm_num_groups)


def _text_encoder(hidden: int, layers: int, heads: int, inter: int, tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=max(len(tokenizer), 49408 if hidden >= 512 else 0),
                         hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=inter,
                         max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(cfg)


def _bundle(unet_config: dict, vae_config: dict, text: tuple, seed: int, source: str,
            resolution: int) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..models.tiny import build_offline_tokenizer

    tok = build_offline_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_config)
    te = _text_encoder(*text, tok, seed)
    return ModelBundle(unet, vae, te, tok, resolution=resolution, source=source).to("cpu")


def build_tiny_dift(seed: int = 0) -> ModelBundle:
    """SD 2.1's UNet topology at toy width (the stored case models' shape), random weights.

    CrossAttnDown x3 + Down, Up + CrossAttnUp x3, ``layers_per_block=2``, linear projections,
    ``upcast_attention``, 32 channels per level, heads ``[2, 4, 8, 8]``, cross-attention dim 16;
    a 4-level VAE (16/16/32/32 channels); a 1-layer text encoder of width 16.
    """
    unet = _sd21_unet_config((32, 32, 32, 32), [2, 4, 8, 8], 16, 32)
    vae = sd_vae_config((16, 16, 32, 32), 1, 8, 64)
    return _bundle(unet, vae, (16, 1, 2, 32), seed, f"tiny_dift(seed={seed})", 512)


def build_sd21_random(seed: int = 0) -> ModelBundle:
    """Stable Diffusion 2.1's architecture with random weights: real shapes and FLOPs, for timing.

    UNet 320/640/1280/1280, heads ``[5, 10, 20, 20]`` (head dim 64), cross-attention 1024, linear
    projections; SD's VAE; OpenCLIP-H's text tower shape (1024 wide, 23 layers, 16 heads).
    """
    unet = _sd21_unet_config((320, 640, 1280, 1280), [5, 10, 20, 20], 1024, 32)
    vae = sd_vae_config((128, 256, 512, 512), 2, 32, 768)
    return _bundle(unet, vae, (1024, 23, 16, 4096), seed, f"sd21_random(seed={seed})", 768)


def load_dift(path_or_id: str = DIFT_SD21_ID, revision: str | None = None,
              local_files_only: bool | None = None) -> ModelBundle:
    """Stable Diffusion 2.1 (or another SD model) as the DIFT model: a Hub id or a local folder.

    The loading is :func:`dragexp.models.load_pretrained` (the DIFT model is a model source like
    the others); only the error message names the evaluation's settings.

    Raises:
        ModelSourceError: the id is not in the Hugging Face cache and cannot be downloaded, or
            the folder cannot be read; the message says what to do.
    """
    from ..models.errors import ModelSourceError
    from ..models.pretrained import load_pretrained

    try:
        return load_pretrained(path_or_id, revision=revision, local_files_only=local_files_only)
    except ModelSourceError as err:
        msg = str(err).replace("model=local model.path=/path/to/folder",
                               "eval/dift=local eval.dift.path=/path/to/stable-diffusion-2-1")
        raise ModelSourceError(f"DIFT model for the evaluation: {msg} (HF_HUB_OFFLINE=1 fails "
                               "at once instead of retrying)") from err


def load_dift_case_models(folder: str | Path, text_seed: int = 0) -> ModelBundle:
    """The stored tiny DIFT models of a ``dragbench_eval`` conformance case folder.

    UNet and VAE by the rule of ../shared/conformance/README.md (``from_config``, float32,
    strict load; configs from ``case.json["models"]``). The cases replace the text encoder by
    stored embeddings; for use outside a case a seeded tiny text encoder of the UNet's
    cross-attention width is attached.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    from ..models.errors import ModelSourceError
    from ..models.tiny import build_offline_tokenizer

    folder = Path(folder).expanduser()
    cj = folder / "case.json"
    if not cj.is_file():
        raise ModelSourceError(f"stored DIFT models: {cj} not found (give a dragbench_eval case "
                               "folder holding case.json, dift_unet.safetensors, dift_vae.safetensors)")
    models = json.loads(cj.read_text())["models"]
    unet = UNet2DConditionModel.from_config(models["dift_unet.safetensors"]["config"]).float()
    unet.load_state_dict({k: v.float() for k, v in
                          load_file(str(folder / "dift_unet.safetensors")).items()}, strict=True)
    vae = AutoencoderKL(**models["dift_vae.safetensors"]["config"]).float()
    vae.load_state_dict({k: v.float() for k, v in
                         load_file(str(folder / "dift_vae.safetensors")).items()}, strict=True)
    tok = build_offline_tokenizer()
    te = _text_encoder(int(unet.config.cross_attention_dim), 1, 2, 32, tok, text_seed)
    bundle = ModelBundle(unet, vae, te, tok, resolution=512, source=f"stored:{folder.name}")
    with torch.no_grad():  # own memory (not the mapped file), as dragexp.models does
        for m in bundle._modules():
            for p in (*m.parameters(), *m.buffers()):
                p.data = p.data.clone()
    return bundle.to("cpu")
