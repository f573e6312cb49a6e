"""Stable Diffusion 1.5-shaped models with random weights, built from configs without any download.

Two sizes: a toy-width model with SD 1.5's exact topology (so feature indices, attention-layer
counts and block structure mean what they mean in SD 1.5) for tests, and the full SD 1.5
architecture with random weights, for timing and memory measurements.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dragexp.models.bundle import ModelBundle

SD15_SCALING_FACTOR = 0.18215


def sd_vae_config(block_out_channels: tuple[int, ...], layers_per_block: int,
                  norm_num_groups: int, sample_size: int) -> dict:
    """``AutoencoderKL`` config of Stable Diffusion's VAE layout (4 levels, 8x down, 4 latent
    channels, SD 1.x/2.x scaling factor) at the given width."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=block_out_channels,
                layers_per_block=layers_per_block, latent_channels=4,
                norm_num_groups=norm_num_groups, sample_size=sample_size,
                scaling_factor=SD15_SCALING_FACTOR)


_CROSS_ATTN_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_CROSS_ATTN_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

# A handful of merges so the BPE path (not only single bytes) is exercised; the vocabulary still
# covers every byte, so any text tokenizes without unknown tokens.
_TINY_MERGES = (("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("o", "f</w>"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def build_offline_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A tiny byte-level CLIP BPE tokenizer, written to a temporary folder and loaded from it.

    The vocabulary follows CLIP's layout: the 256 byte characters, the same with the ``</w>``
    end-of-word suffix, the merge results, then ``<|startoftext|>`` and ``<|endoftext|>`` last
    (so, as in CLIP, the end token has the largest id). Going through ``from_pretrained`` on
    ``vocab.json`` + ``merges.txt`` is the loading path that works in transformers 5, whose
    ``CLIPTokenizer`` constructor no longer takes file paths; ``model_max_length`` must be
    given because a folder without ``tokenizer_config.json`` carries none.

    Args:
        model_max_length: sequence length prompts are padded/truncated to.

    Returns:
        A CLIPTokenizer of 520 tokens that tokenizes any text.
    """
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in _TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="dragexp_tokenizer_") as folder:
        root = Path(folder)
        (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        merges = "\n".join(" ".join(m) for m in _TINY_MERGES)
        (root / "merges.txt").write_text(f"#version: 0.2\n{merges}\n")
        # The tokenizers backend holds everything in memory, so the folder can go afterwards.
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def _seeded(seed: int, build):
    """Calls ``build()`` with torch's CPU RNG seeded, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _assemble(
    unet_config: dict,
    vae_config: dict,
    text_config: dict,
    tokenizer: CLIPTokenizer,
    seed: int,
    resolution: int,
    source: str,
) -> ModelBundle:
    """Builds the three networks, each from the same seed, and returns them frozen in float32."""
    unet = _seeded(seed, lambda: UNet2DConditionModel(**unet_config))
    vae = _seeded(seed, lambda: AutoencoderKL(**vae_config))
    text_config = dict(
        text_config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**text_config)))
    bundle = ModelBundle(unet, vae, text_encoder, tokenizer, resolution=resolution, source=source)
    # Built in float32 already; casting again would only make diffusers warn.
    return bundle.to("cpu")


def sd_unet_config(block_out_channels: tuple[int, ...], cross_attention_dim: int,
                   norm_num_groups: int, resolution: int) -> dict:
    """``UNet2DConditionModel`` kwargs of SD 1.5's topology at the given width.

    4 levels, ``layers_per_block=2``, 3 cross-attention down blocks + 1 plain, mirrored up
    blocks: 16 transformer blocks (6 down, 1 mid, 9 up), as in SD 1.5, so feature indices and
    attention-layer counts mean the same at every width.
    """
    return dict(sample_size=resolution // 8, in_channels=4, out_channels=4,
                down_block_types=_CROSS_ATTN_DOWN, up_block_types=_CROSS_ATTN_UP,
                block_out_channels=tuple(block_out_channels), layers_per_block=2,
                attention_head_dim=8, cross_attention_dim=cross_attention_dim,
                norm_num_groups=norm_num_groups)


def clip_text_config(vocab_size: int, width: int, layers: int, heads: int, ffn: int,
                     **extra) -> dict:
    """``CLIPTextConfig`` kwargs of a CLIP text tower (77 positions, projection = width)."""
    return dict(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=77,
                projection_dim=width, **extra)


def tiny_unet_config(resolution: int = 128, cross_attention_dim: int = 32) -> dict:
    """UNet2DConditionModel kwargs: SD 1.5's topology (:func:`sd_unet_config`) at width 32."""
    return sd_unet_config((32, 32, 32, 32), cross_attention_dim, 8, resolution)


def build_tiny(seed: int = 0, resolution: int = 128) -> ModelBundle:
    """A toy-width SD 1.5-topology model with seeded random weights, built in well under a second.

    Args:
        seed: seed for every network's initialisation; the same seed gives the same weights.
        resolution: nominal image side (the UNet's ``sample_size`` is ``resolution // 8``).

    Returns:
        A float32, eval-mode, frozen bundle on the CPU.
    """
    vae_config = sd_vae_config((16, 32, 32, 32), 1, 8, resolution)
    tokenizer = build_offline_tokenizer()
    text_config = clip_text_config(len(tokenizer), 32, layers=2, heads=4, ffn=64)
    unet_config = tiny_unet_config(resolution)
    source = f"tiny(seed={seed})"
    return _assemble(unet_config, vae_config, text_config, tokenizer, seed, resolution, source)


def build_sd15_random(seed: int = 0) -> ModelBundle:
    """The full SD 1.5 architecture (UNet ~860M parameters) with seeded random weights.

    Real shapes and real FLOPs without a download, for timing. The tokenizer is the tiny offline
    one; its ids are far below CLIP ViT-L/14's vocabulary size, so the text encoder accepts them.

    Args:
        seed: seed for every network's initialisation.

    Returns:
        A float32, eval-mode, frozen bundle on the CPU at resolution 512.
    """
    unet_config = sd_unet_config((320, 640, 1280, 1280), 768, 32, 512)
    vae_config = sd_vae_config((128, 256, 512, 512), 2, 32, 512)
    # CLIP ViT-L/14's text tower, as used by SD 1.5.
    text_config = clip_text_config(49408, 768, layers=12, heads=12, ffn=3072,
                                   hidden_act="quick_gelu")
    tokenizer = build_offline_tokenizer()
    source = f"sd15_random(seed={seed})"
    return _assemble(unet_config, vae_config, text_config, tokenizer, seed, 512, source)
