"""DragDiffusion's LoRA: augmentation, the LightningModule, save/load/reuse, conformance."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from dragexp.core.augment import crop_offsets, lora_views, resize_shorter, torch_randint
from dragexp.core.lora import (LORA_WEIGHT_NAME, add_lora, load_lora, lora_cache_key,
                               lora_parameters, lora_state_dict, set_lora_state)
from dragexp.modules import lora_finetune
from dragexp.modules.lora_finetune import RandomDraws, ReplayDraws, ddpm_add_noise, train_lora
from dragexp.core.schedule import SD_SCHEDULER_CONFIG, sd_alphas_cumprod

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"
CPU = dict(accelerator="cpu", precision="32-true")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one intra-op thread (several times faster on a busy 2-core VM)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _no_draw(high: int) -> int:
    raise AssertionError(f"unexpected crop draw (high={high})")


# ---------------------------------------------------------------------------- augmentation

@pytest.mark.parametrize("shape", [(40, 70), (70, 40), (41, 64)])
def test_views_match_torchvision(shape):
    tv = pytest.importorskip("torchvision.transforms")
    size, n = 64, 3
    image = _image(*shape)
    pipeline = tv.Compose([tv.Resize(size, interpolation=tv.InterpolationMode.BILINEAR),
                           tv.RandomCrop(size), tv.ToTensor(), tv.Normalize([0.5], [0.5])])
    torch.manual_seed(123)
    expected = torch.stack([pipeline(Image.fromarray(image)) for _ in range(n)]).to(torch.float16)
    torch.manual_seed(123)
    views = lora_views(image, n, size, randint=torch_randint())
    assert views.dtype == torch.float16 and views.shape == (n, 3, size, size)
    assert torch.equal(views, expected)
    resized = resize_shorter(Image.fromarray(image), size)
    assert np.array_equal(np.asarray(resized), np.asarray(tv.Resize(size)(Image.fromarray(image))))


def test_resize_truncates_and_crop_offsets_are_injected():
    image = _image(96, 160)  # landscape: 512 x int(512 * 160 / 96) = 512 x 853
    resized = resize_shorter(Image.fromarray(image), 512)
    assert (resized.height, resized.width) == (512, 853)
    expected = np.asarray(Image.fromarray(image).resize((853, 512), Image.BILINEAR))
    assert np.array_equal(np.asarray(resized), expected)

    draws = ReplayDraws(crops=[0, 7, 0, 341])
    views = lora_views(image, 2, 512, randint=draws.crop)
    assert draws.crop_highs == [1, 342, 1, 342]  # both ranges drawn, top first
    for view, left in zip(views, (7, 341)):
        crop = torch.from_numpy(expected[:, left:left + 512].copy()).permute(2, 0, 1).float()
        assert torch.equal(view, ((crop / 255 - 0.5) / 0.5).half())


def test_square_image_is_neither_resized_nor_drawn():
    image = _image(64, 64)
    assert resize_shorter(Image.fromarray(image), 64).size == (64, 64)
    assert crop_offsets(64, 64, 64, _no_draw) == (0, 0)
    views = lora_views(image, 2, 64, randint=_no_draw)
    assert torch.equal(views[0], views[1])


def test_alphas_and_add_noise_match_ddpm_scheduler():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", prediction_type="epsilon")
    assert torch.equal(sd_alphas_cumprod(), sched.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(ddpm_add_noise(sd_alphas_cumprod(), x, n, t), sched.add_noise(x, n, t))


# ---------------------------------------------------------------------------- LoRA files

@pytest.fixture(scope="module")
def tiny():
    from dragexp.models import build_tiny

    return build_tiny(seed=0, resolution=64)


def _fresh_unet():
    from dragexp.models import build_tiny

    return build_tiny(seed=0, resolution=64).unet


def _probe(unet, emb):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=emb).sample


def test_add_lora_trains_only_fp32_lora():
    unet = _fresh_unet()
    params = add_lora(unet, rank=4)
    assert len(params) == 2 * 4 * 32  # A and B on q/k/v/out of 32 attention modules
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert len(trainable) == len(params)
    state = lora_state_dict(unet)
    assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if "lora_B" in k)
    set_lora_state(unet, {k: torch.full_like(v, 0.5) for k, v in state.items()})
    assert all(bool((v == 0.5).all()) for v in lora_state_dict(unet).values())


class _LastStep(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(dict(pl_module.last_step))


def test_train_save_load_into_pipeline_and_reuse(tiny, tmp_path, monkeypatch):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    emb = tiny.encode_prompt("a photo of a cat")
    image = _image(48, 80)
    settings = dict(rank=4, lr=1e-2, steps=2, batch_size=2, resolution=64)
    key = lora_cache_key(image, "a photo of a cat", tiny.source, settings)
    assert key != lora_cache_key(image, "a photo of a dog", tiny.source, settings)
    assert key == lora_cache_key(image.copy(), "a photo of a cat", tiny.source, dict(settings))

    unet = tiny.unet
    before = _probe(unet, emb)
    rec = _LastStep()
    path = train_lora(unet, tiny.vae, emb, image, out_dir=tmp_path, cache_key=key,
                      trainer_kwargs=CPU, progress=False, callbacks=[rec], **settings)
    assert path == tmp_path / key / LORA_WEIGHT_NAME and path.is_file()
    assert not list((tmp_path / key).glob(".tmp*"))  # the temporary folder is gone
    assert len(rec.steps) == 2
    assert set(rec.steps[0]) == {"loss", "noisy_model_input", "unet_timesteps", "model_pred"}
    assert rec.steps[0]["noisy_model_input"].shape == (2, 4, 8, 8)
    trained = _probe(unet, emb)  # the adapter stays active
    assert not torch.allclose(trained, before, atol=1e-6)
    assert all(not p.requires_grad for p in unet.parameters())

    # a plain diffusers pipeline loads the file
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder,
                                   tokenizer=tiny.tokenizer, unet=_fresh_unet(),
                                   scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    assert torch.allclose(_probe(pipe.unet, emb), before)
    pipe.load_lora_weights(str(path.parent))
    assert torch.allclose(_probe(pipe.unet, emb), trained, atol=1e-6)

    # our loader gives the same weights
    other = _fresh_unet()
    load_lora(other, path)
    ref = lora_state_dict(unet)
    assert all(torch.equal(v, ref[k]) for k, v in lora_state_dict(other).items())

    # same key: the file is reused, nothing is trained
    def no_fit(*args, **kwargs):
        raise AssertionError("train_lora trained although a LoRA for this key exists")

    monkeypatch.setattr(lora_finetune, "fit_lora", no_fit)
    again = _fresh_unet()
    assert train_lora(again, tiny.vae, emb, image, out_dir=tmp_path, cache_key=key,
                      trainer_kwargs=CPU, progress=False, **settings) == path
    assert torch.allclose(_probe(again, emb), trained, atol=1e-6)


def test_random_draws_are_seeded_and_replay_checks():
    a, b = RandomDraws(5), RandomDraws(5)
    assert [a.crop(10) for _ in range(4)] == [b.crop(10) for _ in range(4)]
    assert torch.equal(a.noise((2, 3)), b.noise((2, 3)))
    t = a.timesteps(64)
    assert torch.equal(t, b.timesteps(64)) and t.dtype == torch.int64
    assert 0 <= int(t.min()) and int(t.max()) <= 999
    replay = ReplayDraws(crops=[3], timesteps=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError):
        replay.crop(3)  # offset outside [0, high)
    assert replay.timesteps(2).tolist() == [1, 2]
    with pytest.raises(IndexError):
        replay.timesteps(2)  # nothing recorded is left
    with pytest.raises(RuntimeError):
        replay.noise((1,))  # never recorded


def test_load_reference_saved_file():
    case = CONFORMANCE / "dragdiffusion_fn_lora_train"
    if not (case / "expected_reference_saved_lora.safetensors").is_file():
        pytest.skip(f"conformance data not found at {case}")
    from safetensors.torch import load_file

    from dragexp.conformance.case import Case

    unet, _ = Case.load(case).build_unet()
    load_lora(unet, case / "expected_reference_saved_lora.safetensors")
    expected = {k[len("lora_final."):]: v for k, v in
                load_file(str(case / "expected.safetensors")).items()
                if k.startswith("lora_final.")}
    got = lora_state_dict(unet)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(not p.requires_grad for p in lora_parameters(unet))


# ---------------------------------------------------------------------------- conformance

@pytest.mark.parametrize("name", ["dragdiffusion_fn_lora_augment", "dragdiffusion_fn_lora_train"])
def test_conformance_case(name, capsys):
    case = CONFORMANCE / name
    if not (case / "case.json").is_file():
        pytest.skip(f"conformance case not found at {case}")
    from dragexp.conformance.__main__ import main

    rc = main([str(case)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"PASS {name}" in out
