"""Tests for dragexp.models: tiny/random builds, the bundle's encode/decode, and every load path.

Everything runs offline on CPU with the tiny SD 1.5-topology model; the full-size random build is
gated behind the ``slow`` marker.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention import BasicTransformerBlock

from dragexp.models import (
    ModelBundle,
    ModelSourceError,
    build_sd15_random,
    build_tiny,
    load_pretrained,
    load_single_file,
    save_bundle,
    save_single_file,
)
from dragexp.models.single_file import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny models gain nothing from intra-op threads, and on a busy machine OpenMP threads
    # waiting on each other make each UNet call about 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> ModelBundle:
    return build_tiny(seed=0)


@pytest.fixture(scope="module")
def saved_folder(tiny, tmp_path_factory):
    return save_bundle(tiny, tmp_path_factory.mktemp("tiny_pipeline"))


@pytest.fixture(scope="module")
def unet_inputs(tiny):
    gen = torch.Generator().manual_seed(123)
    latent = torch.randn(1, 4, 16, 16, generator=gen)
    text = tiny.encode_prompt("a photo of a cat sitting on a red sofa")
    return latent, torch.tensor([681]), text


def _unet_out(bundle: ModelBundle, inputs) -> torch.Tensor:
    latent, t, text = inputs
    with torch.no_grad():
        return bundle.unet(latent, t, encoder_hidden_states=text).sample


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_tiny_bundle_is_frozen_float32(tiny):
    assert tiny.source == "tiny(seed=0)"
    assert tiny.resolution == 128
    assert tiny.scaling_factor == pytest.approx(0.18215)
    assert tiny.device == torch.device("cpu")
    for module in (tiny.unet, tiny.vae, tiny.text_encoder):
        assert not module.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters())


def test_tiny_is_seeded_and_leaves_global_rng_alone(tiny):
    again = build_tiny(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(tiny, name), getattr(again, name))
    other = build_tiny(seed=1)
    assert not torch.equal(tiny.unet.conv_in.weight, other.unet.conv_in.weight)

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_tiny(seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_unet_has_sd15_feature_index_convention(tiny):
    unet = tiny.unet
    count = lambda m: sum(isinstance(x, BasicTransformerBlock) for x in m.modules())  # noqa: E731
    assert count(unet) == 16
    assert [count(b) for b in unet.down_blocks] == [2, 2, 2, 0]
    assert count(unet.mid_block) == 1
    assert [count(b) for b in unet.up_blocks] == [0, 3, 3, 3]
    assert len(unet.up_blocks) == 4
    # One self- and one cross-attention processor per transformer block.
    assert len(unet.attn_processors) == 32
    cfg = unet.config
    assert tuple(cfg.block_out_channels) == (32, 32, 32, 32)
    assert (cfg.layers_per_block, cfg.attention_head_dim, cfg.norm_num_groups) == (2, 8, 8)
    assert cfg.cross_attention_dim == 32 and cfg.sample_size == 16


@pytest.mark.parametrize(
    ("hw", "latent_hw"),
    [((128, 128), (16, 16)), ((120, 136), (15, 17)), ((129, 128), (16, 16)), ((341, 64), (42, 8))],
)
def test_encode_decode_shapes(tiny, hw, latent_hw):
    image = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latent = tiny.encode_image(image)
    assert latent.shape == (2, 4, *latent_hw)
    decoded = tiny.decode(latent)
    assert decoded.shape == (2, 3, latent_hw[0] * 8, latent_hw[1] * 8)
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_encode_image_mean_vs_sample(tiny):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = tiny.encode_image(image)
    posterior_mean = tiny.vae.encode(image).latent_dist.mean * 0.18215
    torch.testing.assert_close(mean, posterior_mean)
    s1 = tiny.encode_image(image, sample=True, generator=torch.Generator().manual_seed(7))
    s2 = tiny.encode_image(image, sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2) and not torch.equal(s1, mean)
    assert not mean.requires_grad


def test_encode_prompt_and_tokenizer(tiny):
    emb = tiny.encode_prompt("a photo of a cat")
    assert emb.shape == (1, 77, 32) and emb.dtype == torch.float32
    assert not torch.equal(emb, tiny.encode_prompt("a photo of a dog"))
    # Arbitrary text, including non-ASCII and over-long prompts, tokenizes and is cut to 77.
    for prompt in ("", "Ünïcode ☃ and emoji 🐱, DRAG the handle!!", " ".join(["word"] * 200)):
        assert tiny.encode_prompt(prompt).shape == (1, 77, 32)
    ids = tiny.tokenizer("the cat and the dog").input_ids
    assert ids[0] == tiny.tokenizer.bos_token_id and ids[-1] == tiny.tokenizer.eos_token_id
    assert max(ids) < tiny.text_encoder.config.vocab_size
    assert tiny.tokenizer.model_max_length == 77


def test_to_moves_and_casts():
    bundle = build_tiny(seed=3).to("cpu", torch.float64)
    assert all(p.dtype == torch.float64 for p in bundle.unet.parameters())
    assert bundle.encode_prompt("x").dtype == torch.float64
    assert bundle.encode_image(torch.zeros(1, 3, 16, 16)).dtype == torch.float64


def test_save_bundle_load_pretrained_round_trip(tiny, saved_folder, unet_inputs):
    assert {p.name for p in saved_folder.iterdir()} >= {
        "unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"
    }
    loaded = load_pretrained(str(saved_folder))
    assert loaded.source == f"local:{saved_folder}"
    assert loaded.resolution == 128  # read from the UNet's sample_size
    assert torch.equal(_unet_out(loaded, unet_inputs), _unet_out(tiny, unet_inputs))
    assert torch.equal(loaded.encode_prompt("a cat"), tiny.encode_prompt("a cat"))
    _assert_same_weights(loaded.vae, tiny.vae)
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_saved_folder_loads_as_plain_diffusers_pipeline(tiny, saved_folder, unet_inputs):
    pipe = StableDiffusionPipeline.from_pretrained(str(saved_folder), safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.set_alpha_to_one
    with torch.no_grad():
        eps = pipe.unet(unet_inputs[0], unet_inputs[1], encoder_hidden_states=unet_inputs[2]).sample
    # Not bitwise: plain diffusers leaves the weights in the memory-mapped file, at alignments
    # that change CPU kernels' summation order (load_pretrained copies them out).
    torch.testing.assert_close(eps, _unet_out(tiny, unet_inputs), rtol=0, atol=1e-5)
    out = pipe("a cat", height=64, width=64, num_inference_steps=2, output_type="latent")
    assert out.images.shape == (1, 4, 8, 8)


def test_vae_override_from_local_folder(tiny, saved_folder, tmp_path):
    other_vae = build_tiny(seed=1).vae
    other_vae.save_pretrained(tmp_path / "vae1")
    loaded = load_pretrained(str(saved_folder), vae=str(tmp_path / "vae1"))
    assert isinstance(loaded.vae, AutoencoderKL)
    _assert_same_weights(loaded.vae, other_vae)
    assert loaded.source.endswith(f"+vae:{tmp_path / 'vae1'}")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_round_trip(tiny, saved_folder, unet_inputs, tmp_path, suffix):
    from diffusers.loaders.single_file_utils import (
        infer_diffusers_model_type,
        load_single_file_checkpoint,
    )

    path = save_single_file(tiny, tmp_path / f"tiny{suffix}")
    checkpoint = load_single_file_checkpoint(str(path))
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)) for k in checkpoint)
    # Same keys diffusers uses to recognise an SD 1.5 checkpoint and its CLIP text encoder.
    assert infer_diffusers_model_type(checkpoint) == "v1"
    assert f"{CLIP_PREFIX}text_model.embeddings.position_embedding.weight" in checkpoint
    assert checkpoint[f"{VAE_PREFIX}encoder.mid.attn_1.q.weight"].ndim == 4

    loaded = load_single_file(str(path), config=str(saved_folder))
    assert loaded.source == f"single_file:{path}" and loaded.resolution == 128
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(loaded, name), getattr(tiny, name))
    assert torch.equal(_unet_out(loaded, unet_inputs), _unet_out(tiny, unet_inputs))
    assert torch.equal(loaded.encode_prompt("a red car"), tiny.encode_prompt("a red car"))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(loaded.decode(loaded.encode_image(image)), tiny.decode(tiny.encode_image(image)))


def test_missing_hub_id_offline_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match="dragexp-test/does-not-exist") as info:
        load_pretrained("dragexp-test/does-not-exist")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message and "hf download" in message


def test_unreachable_hub_fails_fast_without_hf_hub_offline(monkeypatch):
    """No network and no HF_HUB_OFFLINE: the id is looked up in the cache only, at once, and the
    message says why, instead of a minute of connection retries."""
    import socket

    from dragexp.models import pretrained

    def refuse(*_, **__):
        raise OSError("no route to host")

    for var in ("HF_HUB_OFFLINE", *pretrained._PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pretrained.huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(pretrained, "_REACHABLE", {})
    monkeypatch.setattr(socket, "create_connection", refuse)
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match="dragexp-test/does-not-exist") as info:
        load_pretrained("dragexp-test/does-not-exist")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "cannot be reached from this machine" in message and "hf download" in message
    assert "\n" not in message


def test_missing_local_sources_name_the_path(tmp_path):
    missing_file = tmp_path / "nope.safetensors"
    with pytest.raises(ModelSourceError, match="nope.safetensors"):
        load_single_file(str(missing_file))
    with pytest.raises(ModelSourceError, match="missing_folder"):
        load_pretrained(str(tmp_path / "missing_folder"))


def test_single_file_without_local_config_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_single_file(tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(ModelSourceError, match="config="):
        load_single_file(str(path), config="dragexp-test/does-not-exist")


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("DRAGEXP_RUN_SLOW") != "1",
    reason="builds 1B random parameters (~30 s, 5 GB); set DRAGEXP_RUN_SLOW=1",
)
def test_sd15_random_has_sd15_sizes():
    bundle = build_sd15_random(seed=0)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(bundle.unet) == 859_520_964  # SD 1.5's UNet
    assert count(bundle.vae) == 83_653_863
    assert count(bundle.text_encoder) == 123_060_480  # CLIP ViT-L/14 text tower
    assert bundle.resolution == 512 and bundle.unet.config.cross_attention_dim == 768
    assert max(bundle.tokenizer("a photo of a cat").input_ids) < bundle.text_encoder.config.vocab_size
