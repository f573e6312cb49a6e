"""DragonDiffusion / DiffEditor: energies, masks, memory bank, sampler schedule, tasks, cases.

Fast and seeded (one thread). Hard-coded numbers pin the arithmetic: OpenCV's bilinear resize
(values recorded from cv2 4.11), the energy of a known pair of feature maps, the NaN guard.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFORMANCE, conformance_cases, require_shared
from dragexp.data import DragSample, FolderSamples, write_sample_folder
from dragexp.data.sample import SampleError
from dragexp.methods.base import working_size
from dragexp.methods.dragondiffusion.regions import (DragRegions, copy_latent_patches,
                                                     cv2_resize_linear, process_drag, process_move)
from dragexp.methods.dragondiffusion.sampling import DragonSchedule
from dragexp.conformance.dragondiffusion import ConvStubEstimator
from dragexp.methods.dragondiffusion.energy import drag_energies, guidance_drag
from dragexp.methods.base import EditContext
from dragexp.methods.dragondiffusion.memory_bank import (DragonAttentionControl, MemoryBank,
                                                         bank_size_bytes,
                                                         decoder_self_attention_layers)

ROOT = Path(__file__).resolve().parents[1]
CASES = conformance_cases("dragondiffusion_")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- pinned arithmetic -------------------------------------------------------------------

def test_cv2_bilinear_resize_matches_opencv_values():
    m = np.array([[139, 74, 229, 241, 169, 65, 6], [160, 149, 106, 38, 175, 188, 205],
                  [175, 229, 98, 249, 10, 148, 95], [86, 147, 198, 66, 39, 106, 213],
                  [171, 45, 167, 57, 69, 81, 55]], np.uint8)
    assert cv2_resize_linear(m, (3, 4)).tolist() == [[128, 186, 171, 85], [195, 117, 40, 115],
                                                     [119, 163, 59, 101]]
    assert cv2_resize_linear(m, (8, 9))[5].tolist() == [91, 132, 170, 166, 77, 46, 77, 141, 205]
    b = np.zeros((10, 10), np.uint8)
    b[3:6, 4:8] = 255
    on = (cv2_resize_linear(np.repeat(b[..., None], 3, 2), (7, 6))[..., 0] > 0.5).astype(int)
    assert np.nonzero(on.any(1))[0].tolist() == [2, 3, 4] and np.nonzero(on.any(0))[0].tolist() == [2, 3, 4]


def test_working_size_by_area():
    assert working_size((160, 240), area=24576) == (128, 192)
    assert working_size((341, 512), area=512 ** 2) == (448, 640)     # sides x64
    with pytest.raises(ValueError, match="at least 64"):
        working_size((40, 400), area=64 ** 2)


def _patch(h, w, r, c):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[r - 1:r + 2, c - 1:c + 2] = True
    return m


def test_drag_energy_of_known_features():
    """ref = e1 everywhere; cur = e1 except e2 on the target patch.

    edit: cos(cur[target], ref[handle]) = 0 -> S = 1/2 -> 4 / (1 + 2) = 4/3; the vacated handle
    pixels keep S = 1 -> + 0.2; content outside the drawn mask (the target is inside it) S = 1 ->
    6 / 5.
    """
    H = W = 8
    ref = torch.zeros(1, 2, H, W)
    ref[:, 0] = 1
    cur = ref.clone()
    target = _patch(H, W, 4, 5)
    cur[0, :, target] = torch.tensor([[0.0], [1.0]])
    handle = _patch(H, W, 4, 3)
    other = torch.ones(1, 1, H, W, dtype=torch.bool)
    other[..., 2:7, 1:8] = False
    e_edit, e_con = drag_energies([cur], [ref], handle[None], target[None], other, 4, 0.2, 6)
    assert float(e_edit.value) == pytest.approx(4 / 3 + 0.2, abs=1e-6)
    assert float(e_con.value) == pytest.approx(1.2, abs=1e-6)
    assert not e_edit.empty and not e_con.empty


def test_empty_region_reports_nan_but_guidance_is_finite():
    g = torch.Generator().manual_seed(0)
    est = ConvStubEstimator(torch.randn(8, 4, 3, 3, generator=g) * 0.3, torch.zeros(8),
                            torch.randn(8, 4, 3, 3, generator=g) * 0.3, torch.zeros(8))
    x = torch.randn(1, 4, 8, 12, generator=g)
    ref = torch.randn(1, 4, 8, 12, generator=g)
    same = _patch(16, 24, 6, 9)[None]              # handle patch == target patch: R is empty
    mask_x0 = torch.zeros(64, 96)
    mask_x0[10:40, 20:60] = 1
    other = torch.ones(1, 1, 16, 24, dtype=torch.bool)
    other[..., 3:10, 5:15] = False
    out = guidance_drag(est, x, est(ref), 0, mask_x0, same, same, other, 2000.0, 4, 0.2, 6)
    assert torch.isnan(out.energy_edit)
    assert torch.isfinite(out.energy_content)
    for t in (out.guidance, out.grad_edit, out.grad_content):
        assert torch.isfinite(t).all() and t.abs().sum() > 0
    # the finite guidance is that of the edit term alone (the empty inpaint term adds nothing)
    apart = _patch(16, 24, 6, 14)[None]
    other2 = guidance_drag(est, x, est(ref), 0, mask_x0, same, apart, other, 2000.0, 4, 0.0, 6)
    assert torch.isfinite(other2.energy_edit)


# -- masks, patches, latent copy ---------------------------------------------------------

def test_process_drag_clips_x_with_the_height_and_copies_in_place():
    mask = np.zeros((64, 128), np.uint8)
    mask[8:40, 16:100] = 255
    # the second target sits near the right edge: x is clipped with the grid's height (bug)
    regions = process_drag(mask, [(20, 20), (40, 24), (60, 30), (124, 30)], (64, 128), 1.0, 4.0)
    assert regions.handle_patches.shape == (2, 16, 32)
    assert regions.target_rc == [(6, 10), (7, 14)]          # 124 // 4 = 31 -> clipped to 16 - 2
    assert int(regions.target_patches[1].sum()) == 9
    latent = torch.arange(2 * 8 * 16, dtype=torch.float32).reshape(1, 2, 8, 16)
    before = latent.clone()
    out = copy_latent_patches(latent, regions, 2)
    assert out is latent and not torch.equal(latent, before)
    assert torch.equal(latent[..., 2:5, 4:7], before[..., 1:4, 1:4])   # pair 0: (6,10) <- (5,5)


def test_latent_patch_on_the_border_errors_or_clips():
    regions = DragRegions(torch.zeros(8, 8), torch.ones(1, 1, 16, 16, dtype=torch.bool),
                          torch.zeros(1, 16, 16), torch.zeros(1, 16, 16), [(6, 6)], [(6, 15)])
    with pytest.raises(ValueError, match="latent_copy_border=clip"):
        copy_latent_patches(torch.zeros(1, 4, 8, 8), regions, 2)
    lat = torch.arange(64.0).reshape(1, 1, 8, 8)
    copy_latent_patches(lat, regions, 2, border="clip")
    assert torch.equal(lat[0, 0, 2:5, 6:8], torch.arange(64.0).reshape(8, 8)[2:5, 2:4])


def test_process_move_rolls_and_pastes():
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[16:32, 16:32] = 255
    r = process_move(mask, (64, 64), 8, 8, 4.0, 1.0, 1.0)
    assert torch.equal(torch.nonzero(r.mask_cur[0, 0]).min(0).values, torch.tensor([6, 6]))
    assert int(r.mask_overlap.sum()) == 4 and int(r.mask_non_overlap.sum()) == 16 - 4
    small = process_move(mask, (64, 64), 0, 0, 4.0, 1.0, 0.5)
    assert small.mask_tar.shape[-2:] == (8, 8) and small.mask_cur.shape[-2:] == (16, 16)


# -- memory bank and attention --------------------------------------------------------------

def test_memory_bank_records_decoder_self_attention_and_concatenates(tiny):
    from dragexp.core.attention import attention_control

    unet = tiny.unet
    layers = decoder_self_attention_layers(unet)
    assert len(layers) == 9 and all(n.startswith("up_blocks.") and n.endswith("attn1.processor")
                                    for n in layers)
    bank = MemoryBank(steps=[3])
    ctl = DragonAttentionControl(layers, bank, "drag", (3, None))
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad(), attention_control(unet, ctl):
        for i in (2, 3):
            ctl.set("record", i)
            unet(x, 500, encoder_hidden_states=text)
        assert sorted(bank.entries) == [3] and set(bank.entries[3]) == set(layers)
        assert bank.nbytes == bank_size_bytes(unet, (8, 8), steps=1)
        ctl.set("sample", 3)
        seen = {}
        orig = ctl.keys_values

        def spy(layer, q, k, v):
            k2, v2 = orig(layer, q, k, v)
            seen[layer] = (k.shape, k2.shape)
            return k2, v2

        ctl.keys_values = spy
        eps_bank = unet(torch.cat([x, x]), 500, encoder_hidden_states=torch.cat([text, text]))[0]
        del ctl.keys_values
        with ctl.plain():
            eps_plain = unet(torch.cat([x, x]), 500, encoder_hidden_states=torch.cat([text, text]))[0]
    for layer in layers:
        (b, n, c), (b2, n2, c2) = seen[layer]
        assert (b2, n2, c2) == (b, 2 * n, c)       # own tokens + the bank's, bank repeated x2
    assert not torch.allclose(eps_bank, eps_plain)
    ctl.mode = "move"
    ctl.set("sample", 3)
    k = torch.randn(2, 64, bank.entries[3][layers[-1]][0].shape[-1])
    assert torch.equal(ctl.keys_values(layers[-1], None, k, k)[0][0], bank.entries[3][layers[-1]][0][0])


def test_memory_bank_can_store_half_precision(tiny):
    bank = MemoryBank(dtype=torch.float16)
    bank.put(5, "l", torch.randn(1, 16, 8), torch.randn(1, 16, 8))
    assert bank.nbytes == 2 * 16 * 8 * 2
    k, _ = bank.get(5, "l", torch.zeros(1, dtype=torch.float32))
    assert k.dtype == torch.float32


def test_image_prompt_only_when_active(tiny):
    from dragexp.methods.dragondiffusion.image_prompt import ImagePromptAdapter, dragon_attention

    unet = tiny.unet
    g = torch.Generator().manual_seed(1)
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    weights = {}
    for n in names:
        attn = unet.get_submodule(n[:-len(".processor")])
        shape = (attn.to_k.out_features, 32)
        weights[n] = (torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))
    ip = ImagePromptAdapter(weights, scale=0.5, num_tokens=4)
    ctl = DragonAttentionControl(decoder_self_attention_layers(unet), MemoryBank(), "drag", (99, None))
    x, text, img = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32), torch.randn(1, 4, 32)
    ctx = torch.cat([text, img], dim=1)
    with torch.no_grad():
        plain = unet(x, 500, encoder_hidden_states=text)[0]
        with dragon_attention(unet, ctl, ip):
            ctl.set("sample", 3)                   # outside ip_steps: image tokens are split off only
            off = unet(x, 500, encoder_hidden_states=ctx)[0]
            ctl.set("sample", 12)
            on = unet(x, 500, encoder_hidden_states=ctx)[0]
    assert torch.allclose(off, plain, atol=1e-5)
    assert not torch.allclose(on, plain, atol=1e-3)
    assert all(".processor" not in k for k in unet.state_dict())


def test_ip_adapter_checkpoint_layout_maps_processors_in_order(tiny):
    from dragexp.methods.dragondiffusion.image_prompt import ImagePromptAdapter

    names = list(tiny.unet.attn_processors)
    ckpt = {"ip_adapter": {f"{n}.to_{kv}_ip.weight": torch.full((32, 32), float(n))
                           for n, name in enumerate(names) if name.endswith("attn2.processor")
                           for kv in "kv"}}
    ip = ImagePromptAdapter.from_ip_adapter(tiny.unet, ckpt)
    assert len(ip.names) == 16
    k, _ = ip.projections(names[1])
    assert float(k.weight[0, 0]) == 1.0


def test_missing_image_encoder_is_a_clear_error(tmp_path, monkeypatch):
    from dragexp.methods.dragondiffusion.image_prompt import ImagePromptEncoder, load_ip_checkpoint
    from dragexp.models.errors import ModelSourceError

    with pytest.raises(ModelSourceError, match="image encoder folder not found"):
        ImagePromptEncoder(str(tmp_path / "no" / "such" / "folder"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="image encoder"):
        ImagePromptEncoder("nobody/no-such-encoder")
    with pytest.raises(ModelSourceError, match="checkpoint not found"):
        load_ip_checkpoint(str(tmp_path / "ip.bin"))


def _ip_plus_state(embed, hidden, out, queries, g, depth=4):
    """An IP-Adapter-plus resampler state dict in the IP-Adapter layout (1 head of 64)."""
    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = {"latents": r(1, queries, hidden), "proj_in.weight": r(hidden, embed),
          "proj_in.bias": torch.zeros(hidden), "proj_out.weight": r(out, hidden),
          "proj_out.bias": torch.zeros(out), "norm_out.weight": torch.ones(out),
          "norm_out.bias": torch.zeros(out)}
    for i in range(depth):
        for n in ("0.norm1", "0.norm2", "1.0"):
            sd[f"layers.{i}.{n}.weight"], sd[f"layers.{i}.{n}.bias"] = torch.ones(hidden), torch.zeros(hidden)
        sd.update({f"layers.{i}.0.to_q.weight": r(64, hidden), f"layers.{i}.0.to_kv.weight": r(128, hidden),
                   f"layers.{i}.0.to_out.weight": r(hidden, 64), f"layers.{i}.1.1.weight": r(4 * hidden, hidden),
                   f"layers.{i}.1.3.weight": r(hidden, 4 * hidden)})
    return sd


def test_diffeditor_image_prompt_from_local_sources(tiny, tmp_path):
    """D+ appearance with the image prompt from a local CLIP vision folder and an IP-Adapter
    checkpoint (tiny random stand-ins of h94/IP-Adapter's encoder and ip_sd15_64.bin)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from dragexp.data.dragon_samples import DragonSamples
    from dragexp.methods.dragondiffusion.method import DragonDiffusionMethod

    g = torch.Generator().manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        image_size=224, patch_size=32, projection_dim=16)).save_pretrained(tmp_path / "encoder")
    names = list(tiny.unet.attn_processors)
    ip = {f"{n}.to_{kv}_ip.weight": torch.randn(32, 32, generator=g) * 0.1
          for n, name in enumerate(names) if name.endswith("attn2.processor") for kv in "kv"}
    torch.save({"image_proj": _ip_plus_state(32, 32, 32, 4, g), "ip_adapter": ip}, tmp_path / "ip.bin")
    s = DragonSamples(1, (64, 64), 0, task="appearance")[0]
    m = DragonDiffusionMethod(task="appearance", alg="D+", n_inference_step=6, max_resolution=64,
                              guidance_steps=4, dense_guidance_steps=1, time_travel_steps=[2],
                              time_travel_repeats=2, sde_steps=[1, 1], ip_steps=[1, 3],
                              bank_start_step=1, blend_bank_steps=[0, 5],
                              image_prompt=dict(enabled=True, encoder=str(tmp_path / "encoder"),
                                                adapter=str(tmp_path / "ip.bin"), num_tokens=4))
    torch.manual_seed(0)
    r = m.edit(s, tiny, EditContext())
    adapter, _ = next(iter(m._ip_cache.values()))
    assert len(adapter.names) == 16 and adapter.image_proj is not None
    assert r.image.shape == (64, 64, 3) and r.num_steps == 3
    assert all(".processor" not in k for k in tiny.unet.state_dict())


# -- schedule -------------------------------------------------------------------------------

def test_schedules_of_both_algorithms():
    d, dp = DragonSchedule("D"), DragonSchedule("D+")
    assert sum(d.guided(i) for i in range(50)) == 30 and all(d.repeats(i) == 1 for i in range(50))
    assert sum(dp.guided(i) * dp.repeats(i) for i in range(50)) == 28
    assert [i for i in range(50) if dp.repeats(i) > 1] == [22, 24, 26, 28]
    assert [i for i in range(50) if dp.in_sde(i)] == list(range(11, 20))
    with pytest.raises(ValueError, match="alg"):
        DragonSchedule("E")


# -- tasks and inputs -----------------------------------------------------------------------

def _sample(**extras):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 1
    return DragSample("cat_01", img, [(30, 30), (40, 30)], mask, "a cat", extras=extras)


def test_missing_task_input_names_the_sample_and_the_input():
    from dragexp.methods.dragondiffusion.method import task_inputs

    with pytest.raises(SampleError, match=r"sample 'cat_01'.*'appearance'.*image2"):
        task_inputs(_sample(), "appearance")
    with pytest.raises(SampleError, match=r"sample 'cat_01'.*'paste'.*mask2"):
        task_inputs(_sample(image2=np.zeros((32, 32, 3), np.uint8)), "paste")
    with pytest.raises(SampleError, match=r"'resize' needs a scale"):
        task_inputs(_sample(), "resize")
    s = _sample()
    s.mask[:] = 0
    with pytest.raises(SampleError, match=r"'move' needs a mask"):
        task_inputs(s, "move")
    assert task_inputs(_sample(), "move").shift == (10.0, 0.0)
    assert task_inputs(_sample(shift=[3, -4], scale=1.5), "move").scale == 1.5


def test_folder_sample_second_image_by_file_name(tmp_path):
    from PIL import Image

    from dragexp.methods.dragondiffusion.method import task_inputs

    folder = write_sample_folder(_sample(), tmp_path / "edits" / "cat_01")
    Image.fromarray(np.full((48, 40, 3), 200, np.uint8)).save(folder / "second.png")
    m = np.zeros((48, 40), np.uint8)
    m[10:20, 10:20] = 255
    Image.fromarray(m).save(folder / "second_mask.png")
    with (folder / "drag.yaml").open("a") as fh:
        fh.write("image2: second.png\nmask2: second_mask.png\nprompt2: a dog\n")
    s = FolderSamples(tmp_path / "edits")[0]
    inp = task_inputs(s, "paste")
    assert inp.image2.shape == (48, 40, 3) and int((inp.mask2 > 0).sum()) == 100
    assert inp.prompt2 == "a dog" and inp.shift == (10.0, 0.0)


def test_builtin_samples_carry_every_task_input():
    from dragexp.data.dragon_samples import DragonSamples
    from dragexp.methods.dragondiffusion.method import TASKS, task_inputs

    for task in TASKS:
        s = DragonSamples(1, (64, 64), 0, task=task)[0]
        inp = task_inputs(s, task)
        assert inp.mask.any()
        if task == "resize":
            assert inp.scale == pytest.approx(1.2)


def test_move_and_dplus_edit_in_process(tiny):
    """A short move edit with the D+ machinery squeezed into 6 steps (SDE, time travel)."""
    from dragexp.data.dragon_samples import DragonSamples
    from dragexp.methods.dragondiffusion.method import DragonDiffusionMethod

    s = DragonSamples(1, (64, 64), 0, task="move")[0]
    m = DragonDiffusionMethod(task="move", alg="D+", n_inference_step=6, max_resolution=64,
                              guidance_steps=4, dense_guidance_steps=1, time_travel_steps=[2],
                              time_travel_repeats=2, sde_steps=[1, 1], ip_steps=[1, 1],
                              bank_start_step=1, memory_bank={"dtype": "float16"})
    torch.manual_seed(0)
    r = m.edit(s, tiny, EditContext())
    assert r.image.shape == (64, 64, 3) and r.image.dtype == np.uint8
    assert r.num_steps == 3                               # guided i = 0, 2 (twice)
    assert r.extras["unet_calls"] == 6 + 1 + 2           # + one repeat, + two re-inversions
    assert r.extras["memory_bank_bytes"] == bank_size_bytes(tiny.unet, (8, 8), 5, 1, 2)
    assert {"inversion", "denoising", "decode"} <= set(r.timings)


# -- conformance cases and the end-to-end run --------------------------------------------------

@pytest.mark.parametrize("case", CASES or [None], ids=lambda c: c.name if c else "absent")
def test_public_case_passes(case, tmp_path):
    if case is None:
        require_shared(CONFORMANCE)
    from safetensors.torch import load_file

    from dragexp.conformance.__main__ import main

    assert main([str(case), "--out", str(tmp_path)]) == 0
    produced = load_file(str(tmp_path / case.name / "produced.safetensors"))
    assert set(load_file(str(case / "expected.safetensors"))) <= set(produced)


def test_train_script_runs_dragondiffusion(tmp_path):
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline", HYDRA_FULL_ERROR="1",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "scripts/train.py", f"hydra.run.dir={tmp_path / 'run'}",
           f"paths.lora_cache={tmp_path / 'lora'}", "method=dragondiffusion", "logger=none",
           "model=tiny", "data=samples", "model.resolution=64", "data.size=[64,64]", "data.n=1", "method.max_resolution=64",
           "method.n_inference_step=6", "method.guidance_steps=4", "method.bank_start_step=1",
           "progress=false"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["num_done"] == 1 and summary["num_failed"] == 0, summary
    sample = next((tmp_path / "run" / "results").iterdir())
    info = json.loads((sample / "result.json").read_text())
    assert info["method"] == "dragondiffusion" and info["num_steps"] == 4
    assert (sample / "dragged_image.png").is_file()


@pytest.mark.parametrize("resolution", [64, 128, 512])
def test_built_in_samples_fit_the_latent_patch_copy_at_every_working_size(resolution):
    """The faithful patch copy raises for a point near the latent's border (as the authors'
    code does); the built-in samples keep their points inside, down to a 64 px working size."""
    from dragexp.data import ProceduralSamples
    from dragexp.data.toybench import ToyBench
    from dragexp.methods.dragondiffusion.regions import as_upload_mask, feature_scale

    samples = [*ProceduralSamples(n=5), *ToyBench(count=30, edits=["translate", "stretch",
                                                                    "rotate"])]
    for s in samples:
        h0, w0 = s.image.shape[:2]
        H, W = working_size((h0, w0), area=resolution ** 2)
        scale = W / w0
        regions = process_drag(as_upload_mask(s.mask), s.points, (H, W), scale,
                               feature_scale([1, 2], 2))
        copy_latent_patches(torch.zeros(1, 4, H // 8, W // 8), regions, 2, "error")
