"""EasyDrag: next-point rule, cosine losses, auto mask, reference attention and guidance, the
public conformance cases, and one end-to-end run of ``scripts/train.py method=easydrag``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import CONFORMANCE, conformance_cases, require_shared
from dragexp.callbacks import AutoMask, AutoMaskError, PointTracking, StopWhenReached
from dragexp.conformance.__main__ import main as conformance_main
from dragexp.conformance.judge import judge_key
from dragexp.drag.losses import consistency_loss, cosine_point_loss, gradient_mask, refine_radius
from dragexp.methods.base import working_size
from dragexp.methods.easydrag.method import drag_points, user_mask
from dragexp.modules.drag_optimisation import DragObjective, DragOptimisation, fit_drag
from dragexp.core.sampling import ReferenceGuidance, ddim_sample
from dragexp.core.schedule import DDIMSchedule
from dragexp.methods.latent_drag.bottleneck import BottleneckTarget
from dragexp.drag.targets import LatentTarget
from dragexp.drag.trackers import NextPointTracker, next_point

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def T(*v):
    return torch.tensor(v, dtype=torch.float32)


# -- arithmetic pinned by hand ----------------------------------------------------------------

def test_next_point_rule():
    # 12-px jump along the unit direction when >= 18 px away: (30,20)->(50,60) is 44.7 px
    assert next_point(T(30, 20), T(50, 60)).tolist() == [35.0, 31.0]
    assert next_point(T(0, 0), T(0, 18)).tolist() == [0.0, 12.0]          # exactly 18: jump
    assert next_point(T(0, 0), T(0, 17.9)).tolist() == [0.0, 17.899999618530273]  # < 18: target
    assert next_point(T(5, 5), T(5, 5)).tolist() == [5.0, 5.0]            # p == t: the target
    assert next_point(T(10, 0.5), T(10, 30.5)).tolist() == [10.0, 12.0]   # 12.5 -> 12 (even)
    assert next_point(T(10, 1.5), T(10, 31.5)).tolist() == [10.0, 14.0]   # 13.5 -> 14
    assert next_point(T(40, 40), T(40, 10)).tolist() == [40.0, 28.0]      # negative direction
    # refine_r: clipped at the map's edges, no clipping at 0 (negative outside the map)
    assert refine_radius(T(2, 60), T(30, 62), 3, (1, 1, 64, 64)) == (2, 2)
    assert refine_radius(T(-1, 5), T(5, 5), 3, (64, 64)) == (-1, 3)


def test_next_point_tracker_accepts_only_strictly_better():
    F0 = torch.zeros(1, 2, 40, 40)
    F0[0, 0] = 1.0
    F1 = F0.clone()
    h0 = T(5, 5)[None]
    tgt = T(5, 35)[None]
    # the candidate (5, 17) looks exactly as much like F0[p0] as the current handle: no move
    assert NextPointTracker()(F0, F1, h0, h0, targets=tgt).tolist() == [[5.0, 5.0]]
    F1[0, 1, 5, 5] = 1.0                  # the current position now looks less like the handle
    assert NextPointTracker()(F0, F1, h0, h0, targets=tgt).tolist() == [[5.0, 17.0]]
    # a handle on its target stays (a tie)
    assert NextPointTracker()(F0, F1, h0, h0, targets=h0).tolist() == [[5.0, 5.0]]


def test_cosine_point_and_consistency_losses():
    F0 = torch.zeros(1, 2, 5, 5)
    F0[:, 0] = 1.0
    F1 = torch.zeros(1, 2, 5, 5)
    F1[:, 1] = 1.0                        # orthogonal everywhere: cos 0, S = 0.5
    h0 = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    tg = torch.tensor([[1.0, 3.0], [3.0, 3.0]])        # the second handle sits on its target
    loss = cosine_point_loss(F0, F1, h0, h0, tg)
    assert loss.item() == pytest.approx(1 / 1.5 + 0.1 / 1.5, abs=1e-7)       # 0.733333
    same = cosine_point_loss(F0, F0, h0, h0, tg)
    assert same.item() == pytest.approx(0.5 + 0.05, abs=1e-7)
    # consistency: F1 = F0 on 3 columns, -F0 on 2: mean cos 0.2, S 0.6, 0.1 / 1.6
    F2 = F0.clone()
    F2[..., 3:] = -F0[..., 3:]
    none = torch.zeros(1, 1, 5, 5)
    assert consistency_loss(F0, F2, none).item() == pytest.approx(0.0625, abs=1e-7)
    right = none.clone()
    right[..., 3:] = 1.0                                 # editable: only cos 1 pixels count
    assert consistency_loss(F0, F2, right).item() == pytest.approx(0.05, abs=1e-7)
    assert consistency_loss(F0, F2, torch.ones(1, 1, 5, 5)) is None   # nothing to keep
    # a latent-resolution mask is nearest-upsampled to the features
    assert consistency_loss(F0, F2, none[..., :1, :1]).item() == pytest.approx(0.0625, abs=1e-7)


def test_gradient_mask_threshold_is_strict():
    g = torch.tensor([0.0, 100.0, 100.5, 255.0]).view(1, 1, 1, 4)
    grad = torch.cat([g, g], dim=1)       # |mean over channels| = g
    assert gradient_mask(grad).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert gradient_mask(-grad).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert gradient_mask(torch.ones(1, 4, 3, 3)).sum() == 0     # constant: NaN -> no pixel


def test_working_size_points_and_masks():
    assert working_size((913, 512), long_side=512) == (512, 256)
    assert working_size((341, 512), long_side=512) == (320, 512)
    assert working_size((60, 76), long_side=64) == (64, 64)
    h, t = drag_points([[256, 100], [300, 456.2]], (913, 512), (512, 256))
    assert h.tolist() == [[56.0, 128.0]] and t.tolist() == [[256.0, 150.0]]
    h, _ = drag_points([[75.9, 59.9], [0, 0]], (60, 76), (64, 64))      # clamped onto the image
    assert h.tolist() == [[63.0, 63.0]]
    assert user_mask(np.zeros((60, 76), np.uint8), (64, 64)).sum() == 0   # blank stays blank
    m = np.zeros((60, 76), np.uint8)
    m[:30] = 255
    assert user_mask(m, (64, 64))[0, 0, :, 0].tolist() == [1.0] * 32 + [0.0] * 32


# -- reference attention and guidance ---------------------------------------------------------

def test_reference_attention_reads_the_last_batch_element(tiny):
    from dragexp.core.attention import reference_attention

    unet = tiny.unet
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    before = dict(unet.attn_processors)

    def run(z, ref=False):
        t2 = text.expand(z.shape[0], -1, -1)
        with torch.no_grad():
            if ref:
                with reference_attention(unet):
                    return unet(z, 681, encoder_hidden_states=t2).sample
            return unet(z, 681, encoder_hidden_states=t2).sample

    plain_x, plain_r = run(x), run(r)
    both = run(torch.cat([x, r]), ref=True)
    assert torch.allclose(both[1:], plain_r, atol=1e-5)           # the reference is untouched
    assert not torch.allclose(both[:1], plain_x, atol=1e-3)        # the edited one reads it
    assert torch.allclose(run(torch.cat([x, x]), ref=True)[:1], plain_x, atol=1e-5)
    assert torch.allclose(run(x, ref=True), plain_x, atol=1e-5)    # batch of one: plain
    assert {k: type(v) for k, v in unet.attn_processors.items()} == \
        {k: type(v) for k, v in before.items()}                      # processors restored


def test_reference_guidance_offset_and_step_range():
    sched = DDIMSchedule.sd15_ldm()
    latents = [torch.full((1, 1, 2, 2), float(k)) for k in range(51)]
    cond, uncond = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    seen = []

    def model(x, t, text):
        seen.append((int(t), x.shape[0], float(x[-1].mean()), float(text.mean())))
        return torch.zeros_like(x)

    for offset, same in ((1, True), (0, False)):
        seen.clear()
        pred = ReferenceGuidance(model, cond, cond if same else uncond, 4.0, latents,
                                 ref_start_step=20, offset=offset)
        ddim_sample(pred, latents[35], sched, sched.edit_index(35))
        guided = [s for s in seen if s[1] == 2]
        assert len(guided) == 20 and guided[0][0] == 381 and guided[-1][0] == 1
        # at t = 381 (loop index 19) the reference is inversion latent 19 (t = 361) in the
        # authors' code, latent 20 (t = 381) aligned
        assert guided[0][2] == 20.0 - offset and guided[-1][2] == 1.0 - offset
        # unguided steps: one call with the same negative prompt (CFG collapses), else two
        assert len(seen) == (20 * 2 + 15 * (1 if same else 2))


# -- auto mask as a callback ------------------------------------------------------------------

def test_auto_mask_with_dragdiffusion_and_refused_on_the_bottleneck(tiny):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = tiny.encode_prompt("x")
    mask = torch.zeros(1, 1, 32, 32)
    h, t = torch.tensor([[10.0, 8.0]]), torch.tensor([[10.0, 24.0]])
    auto = AutoMask()
    module = DragOptimisation(tiny.unet, LatentTarget(), z, 681, text, h, t, mask,
                              DDIMSchedule.sd15(), [3], DragObjective(), 0.01, 3)
    fit_drag(module, [PointTracking(), StopWhenReached(), auto], accelerator="cpu",
             progress=False)
    assert auto.mask_steps[0] == 0 and auto.recomputed[0] == 1
    assert len(auto.masks) == sum(auto.recomputed) >= 1
    m = auto.masks[0]
    assert m.shape == (1, 1, 8, 8) and 0 < m.sum() < 64
    imgs = auto.images((40, 40))
    assert list(imgs)[0] == "auto_mask_00_step000" and imgs["auto_mask_00_step000"].shape == (40, 40)
    with pytest.raises(AutoMaskError, match="bottleneck"):
        AutoMask.check_target(BottleneckTarget())


def test_auto_mask_composes_with_any_method_config():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        dd = compose("train", overrides=["callbacks=[default,auto_mask]"])
        ed = compose("train", overrides=["method=easydrag"])
        ed_user = compose("train", overrides=["method=easydrag",
                                              "callbacks.auto_mask.enabled=false"])
    assert list(dd.callbacks) == ["tracking", "stop", "trajectory", "auto_mask"]
    assert dd.callbacks.tracking.tracker._target_.endswith("NearestFeatureTracker")
    assert ed.callbacks.tracking.tracker._target_.endswith("NextPointTracker")
    assert ed.callbacks.tracking.start_step == 0 and ed.callbacks.stop.threshold == 1.0
    assert ed.callbacks.tracking.tracker.jump == ed.method.jump and ed.callbacks.auto_mask.enabled
    assert not ed_user.callbacks.auto_mask.enabled


# -- the authors' numbers ---------------------------------------------------------------------

CASES = conformance_cases("easydrag_")
# Cases whose latents follow Adam at lr 0.1 through float-noise-level gradients: their outputs
# move by more than the PASS tolerance under a 1e-6 relative perturbation of their own inputs
# (the kernels' rounding is enough), and they pass on CPUs whose vectorised kernels round as the
# recording machine's did (AVX-512; checked on the device machine's Xeon), not on AVX2-only
# CPUs. Their discrete traces are checked everywhere.
CHAOTIC = {"easydrag.fn_drag_update_automask", "easydrag.fn_drag_update_usermask"}
DISCRETE = ("handle_points_after_tracking", "update_point_from_tracking", "mask_recomputed",
            "num_optim_steps", "handle_points_rc_init", "target_points_rc")


def _avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("case", CASES or [None], ids=lambda c: c.name if c else "absent")
def test_public_case(case, tmp_path):
    if case is None:
        require_shared(CONFORMANCE)
    ok = conformance_main([str(case), "--out", str(tmp_path)]) == 0
    kind = json.loads((case / "case.json").read_text())["kind"]
    produced = load_file(str(tmp_path / case.name / "produced.safetensors"))
    expected = load_file(str(case / "expected.safetensors"))
    assert set(expected) <= set(produced)
    if kind in CHAOTIC and not ok and not _avx512():
        for k in DISCRETE:
            if k in expected:
                assert judge_key(k, produced[k], expected[k]).ok, k
        pytest.xfail("latents of this lr-0.1 case amplify kernel rounding; it passes on AVX-512 "
                     "CPUs (discrete traces checked here)")
    assert ok


# -- end to end -------------------------------------------------------------------------------

def test_train_method_easydrag_end_to_end(tmp_path):
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline", HYDRA_FULL_ERROR="1",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "scripts/train.py", f"hydra.run.dir={tmp_path / 'run'}",
           "method=easydrag", "logger=none", "model=tiny", "data=samples", "model.resolution=64", "data.size=[60,76]",
           "data.n=1", "method.n_pix_step=3", "method.n_inference_step=20",
           "method.n_actual_inference_step=5", "method.ref_start_step=3",
           "progress=false"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    sample = next((tmp_path / "run" / "results").iterdir())
    info = json.loads((sample / "result.json").read_text())
    assert info["method"] == "easydrag" and info["lora_path"] is None
    assert np.asarray(Image.open(sample / "dragged_image.png")).shape == (60, 76, 3)
    assert {"encode", "inversion", "optimisation", "denoising", "decode"} <= set(info["timings"])
    masks = sorted((sample / "images").glob("auto_mask_*.png"))
    assert masks and masks[0].name == "auto_mask_00_step000.png"
    assert np.asarray(Image.open(masks[0])).shape == (60, 76)
    traj = json.loads((sample / "trajectory.json").read_text())
    assert len(traj["loss"]) == info["num_steps"] and len(traj["handles"]) >= 1
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["num_done"] == 1 and summary["num_failed"] == 0
