"""The fast path (dragexp.performance.speed) computes the same edits as the faithful one; the profiler and
the benchmark count what they claim to count."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dragexp.callbacks import PointTracking, StopWhenReached
from dragexp.core.features import concat_then_resize
from dragexp.core.lora import add_lora, lora_state_dict
from dragexp.methods.base import EditContext
from dragexp.modules.drag_optimisation import (CosineDragObjective, DragObjective,
                                               DragOptimisation, fit_drag)
from dragexp.modules.lora_finetune import LoRAFineTune, RandomDraws, ReplayDraws, fit_lora
from dragexp.core.schedule import DDIMSchedule
from dragexp.performance.speed import SpeedSettings, apply_to_models
from dragexp.drag.targets import LatentTarget
from dragexp.methods.easydrag.reference import ReferenceLatentTarget

ROOT = Path(__file__).resolve().parents[1]
CPU = dict(accelerator="cpu")


class _CountCalls:
    def __init__(self, module):
        self.batches = []
        self.handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: self.batches.append(args[0].shape[0]), with_kwargs=True)


def _problem(tiny, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 4, 8, 8, generator=g)
    return z, tiny.encode_prompt("a photo")


def test_cached_reference_equals_the_batch_of_two(tiny):
    """EasyDrag's drag step at batch 1 against recorded reference keys/values computes what the
    authors' batch [z_t, z_t^orig] with reference attention computes for z_t: the same eps,
    features and gradient, at half the UNet batch."""
    z, text = _problem(tiny)
    h, t = torch.tensor([[30.0, 20.0]]), torch.tensor([[30.0, 44.0]])
    target = ReferenceLatentTarget(True, cache_reference=True)
    module = DragOptimisation(tiny.unet, target, z, 681, text, h, t, torch.zeros(1, 1, 64, 64),
                              DDIMSchedule.sd15_ldm(), [2, 3], CosineDragObjective(), 0.01, 4,
                              compose_features=concat_then_resize)
    calls = _CountCalls(tiny.unet)
    module.on_train_start()                                  # F0, and the recorded reference
    assert target.reference_kv and calls.batches == [1]
    param = (z + 0.05 * torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
             ).requires_grad_()
    cached = target.forward(module.problem, param)
    eps_b, feats_b = target.batch_forward(module.problem, param)
    calls.handle.remove()
    assert calls.batches == [1, 1, 2]
    # batch 1 and batch 2 convolutions round differently (~1e-5); plain attention is far off
    assert (cached[0] - eps_b[:1]).abs().max() < 1e-4
    assert (cached[0] - target._run(module.problem, param)[0]).abs().max() > 1e-3
    for a, b in zip(cached[1], feats_b):
        assert (a - b[:1]).abs().max() < 1e-4
    g_cached, = torch.autograd.grad(cached[1][0].square().sum(), param)
    g_batch, = torch.autograd.grad(feats_b[0][:1].square().sum(), param)
    assert (g_cached - g_batch).abs().max() < 1e-4 * g_batch.abs().max()


def test_reused_initial_forward_saves_one_forward_and_changes_nothing(tiny):
    z, text = _problem(tiny, 1)
    h, t = torch.tensor([[10.0, 8.0]]), torch.tensor([[10.0, 24.0]])
    runs = {}
    for reuse in (False, True):
        calls = _CountCalls(tiny.unet)
        module = DragOptimisation(tiny.unet, LatentTarget(), z, 681, text, h, t,
                                  torch.zeros(1, 1, 32, 32), DDIMSchedule.sd15(), [3],
                                  DragObjective(), 0.01, 5, reuse_initial_forward=reuse)
        fit_drag(module, [PointTracking(), StopWhenReached()], progress=False, **CPU)
        calls.handle.remove()
        runs[reuse] = (module.result, len(calls.batches), module.handles.clone())
    assert runs[False][1] == 6 and runs[True][1] == 5
    assert torch.equal(runs[True][2], runs[False][2])
    assert torch.allclose(runs[True][0], runs[False][0], atol=1e-7, rtol=0)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _lora_module(tiny, emb, image, steps, **switches):
    """A rank-4 LoRA on a copy of the tiny UNet (seeded init) and its fine-tuning module."""
    unet = copy.deepcopy(tiny.unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_lora(unet, rank=4)
    module = LoRAFineTune(unet, tiny.vae, emb, image, rank=4, lr=1e-2, steps=steps,
                          batch_size=2, resolution=64, draws=RandomDraws(5), **switches)
    return unet, module


def _largest_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - v).abs().max()) for k, v in b.items())


@pytest.mark.parametrize("shape", [(64, 96), (64, 64)])
def test_prefetched_lora_steps_equal_the_faithful_ones(tiny, shape):
    """Same draws in the same order, each distinct view encoded once: the same LoRA."""
    emb = tiny.encode_prompt("a cat")
    finals, losses = {}, {}
    for prefetch in (False, True):
        unet, module = _lora_module(tiny, emb, _image(*shape), 3, prefetch=prefetch)
        seen = []
        step = module.training_step

        def record(batch, idx, step=step, seen=seen):
            out = step(batch, idx)
            seen.append(float(out))
            return out

        module.training_step = record
        fit_lora(module, progress=False, trainer_kwargs=CPU)
        finals[prefetch], losses[prefetch] = lora_state_dict(unet), seen
    if shape == (64, 96):
        assert 1 < module._fetched["mean"].shape[0] <= 6    # distinct crops, each encoded once
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5, atol=1e-7)
    # the VAE sees the views in other batches (rounding ~1e-7), which AdamW's normalised first
    # steps can turn into ~lr-sized moves of weights whose gradient is ~0
    worst = _largest_difference(finals[True], finals[False])
    assert worst < 1e-3                                         # a tenth of one lr step


def test_fused_optimizer_steps_equal_the_per_tensor_ones_in_a_few_launches(tiny):
    """speed.fused_optimizer: the LoRA's AdamW in one kernel gives the per-tensor loop's LoRA."""
    from dragexp.performance.profiling import count_flops

    emb = tiny.encode_prompt("a cat")
    finals, launches = {}, {}
    for fused in (False, True):
        unet, module = _lora_module(tiny, emb, _image(64, 64), 2, fused_optimizer=fused)
        fit_lora(module, progress=False, trainer_kwargs=CPU)
        finals[fused] = lora_state_dict(unet)
        opt = module.configure_optimizers()
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()                                  # the first step creates the state
        with count_flops() as c:
            opt.step()
        launches[fused] = c.launches
    worst = _largest_difference(finals[True], finals[False])
    # the fused kernel rounds differently; AdamW's normalised first steps make that ~1e-5 here
    assert worst < 1e-4                                         # a hundredth of one lr step
    n_tensors = len(finals[False])
    assert launches[True] <= 4 < n_tensors <= launches[False]


def test_prefetch_refuses_replayed_draws(tiny):
    with pytest.raises(ValueError, match="RandomDraws"):
        LoRAFineTune(copy.deepcopy(tiny.unet), tiny.vae, tiny.encode_prompt("a"), _image(64, 64),
                     draws=ReplayDraws(crops=[0]), prefetch=True)


def test_single_branch_denoising_equals_the_edited_branch(tiny):
    """Without reference control (DragNoise) the reference branch never reaches the edited
    one, so denoising the edited latent alone gives the same result."""
    from dragexp.methods.latent_drag.method import DenoiseSettings, denoise

    z, text = _problem(tiny, 2)
    edited = z + 0.1
    sched = DDIMSchedule.sd15()
    settings = DenoiseSettings(reference_control=False, end_step=40)
    bottleneck = torch.randn(1, *tiny.unet.mid_block.resnets[-1].conv2.weight.shape[:1], 2, 2)
    with torch.no_grad():
        both = denoise(tiny.unet, torch.cat([z, edited]), text, sched, 45, settings,
                       bottleneck=bottleneck)
        alone = denoise(tiny.unet, edited, text, sched, 45, settings, bottleneck=bottleneck)
    assert torch.allclose(alone, both[1:], atol=1e-5)


def test_speed_settings_from_config_and_model_preparation(tiny):
    assert SpeedSettings.from_config(None) == SpeedSettings()
    with pytest.raises(ValueError, match="cache_refernce"):
        SpeedSettings.from_config({"cache_refernce": True})
    models = copy.deepcopy(tiny)
    apply_to_models(models, SpeedSettings(channels_last=True))
    conv = models.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert torch.backends.cudnn.benchmark
    apply_to_models(models, SpeedSettings())
    assert models.unet.conv_in.weight.is_contiguous()
    assert not torch.backends.cudnn.benchmark


def test_configs_speed_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        default = compose("train")
        fast = compose("train", overrides=["speed=fast_compiled"])
    assert SpeedSettings.from_config(default.speed) == SpeedSettings()
    s = SpeedSettings.from_config(fast.speed)
    assert s.compile and s.cache_reference and s.precision == "bf16-mixed"


# -- profiling ---------------------------------------------------------------------------------

def test_flop_sum_counts_convolutions_matmuls_and_cpu_attention():
    from dragexp.performance.profiling import count_flops

    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    w = torch.randn(5, 3, 3, 3)
    q = torch.randn(1, 2, 16, 8)
    with count_flops() as c:
        torch.nn.functional.conv2d(x, w, padding=1)
    assert c.get_total_flops() == 2 * 5 * 3 * 9 * 64
    with count_flops() as c:
        torch.randn(4, 6) @ torch.randn(6, 7)
    assert c.get_total_flops() == 2 * 4 * 6 * 7
    with count_flops() as c:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert c.get_total_flops() == 2 * (2 * 2 * 16 * 16 * 8)     # QK^T and AV


def test_flop_sum_agrees_with_torch_flop_counter_on_a_unet_step(tiny):
    """FlopSum evaluates the formulas its own, cheaper way; over a UNet forward and backward
    (linear layers, convolutions, attention and their gradients) it sums what PyTorch's
    FlopCounterMode sums (with the CPU attention formulas dragexp.performance.profiling registers)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dragexp.performance.profiling import count_flops

    z, text = _problem(tiny)
    z = z.expand(2, -1, -1, -1).clone().requires_grad_()
    totals = []
    for mode in (count_flops(), FlopCounterMode(display=False)):
        with mode:
            tiny.unet(z, 500, encoder_hidden_states=text.expand(2, -1, -1)).sample.sum().backward()
        totals.append(mode.get_total_flops())
    assert totals[0] == totals[1] > 0


def test_stage_probe_sees_every_timed_stage():
    from dragexp.performance.profiling import StageProbe
    from dragexp.core.stages import StageTimer, observe_stages

    timer, probe = StageTimer(), StageProbe(count=True)
    with observe_stages(probe):
        with timer("inversion"):
            torch.randn(8, 8) @ torch.randn(8, 8)
        with timer("inversion"):
            torch.randn(8, 8) @ torch.randn(8, 8)
    with timer("decode"):   # after the block: not observed
        pass
    assert set(probe.stages) == {"inversion"} and set(timer.seconds) == {"inversion", "decode"}
    assert probe.stages["inversion"].flops == 2 * 2 * 8 ** 3


def test_flop_sum_counts_kernel_launches_not_views():
    from dragexp.performance.profiling import count_flops

    x = torch.randn(4, 6)
    with count_flops() as c:
        y = x.view(6, 4).unsqueeze(0)           # views: no kernel
        (y + 1).relu()                          # two kernels
        x.t().contiguous()                      # a copy: one kernel
    assert c.launches == 3


def test_merged_lora_computes_the_adapter_with_the_launches_of_a_plain_unet(tiny):
    """speed.merge_lora: the folded weights give the adapter's output with the kernel launches
    of the UNet without adapter, and leave the base weights and the adapter as they were."""
    from dragexp.core.lora import lora_parameters, merged_lora
    from dragexp.performance.profiling import count_flops

    models = copy.deepcopy(tiny)
    unet = models.unet
    z, text = _problem(tiny)
    with torch.no_grad(), count_flops() as plain:
        unet(z, 500, encoder_hidden_states=text)
    add_lora(unet, rank=4)
    g = torch.Generator().manual_seed(1)
    for p in lora_parameters(unet):    # B = 0 at init: give the adapter something to add
        p.data = torch.randn(p.shape, generator=g) * 0.05
        p.requires_grad_(False)
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" not in n}

    def eps():
        with torch.no_grad(), count_flops() as c:
            return unet(z, 500, encoder_hidden_states=text).sample, c.launches

    adapter, adapter_launches = eps()
    with merged_lora(unet):
        merged, merged_launches = eps()
    again, _ = eps()
    assert not any(p.requires_grad for p in lora_parameters(unet))
    unet.disable_adapters()
    without, _ = eps()
    unet.enable_adapters()

    assert (without - adapter).abs().max() > 1e-2           # the adapter changes the output
    assert torch.allclose(merged, adapter, atol=1e-5)
    assert merged_launches == plain.launches < adapter_launches
    assert torch.equal(again, adapter)
    assert all(torch.equal(p, base[n]) for n, p in unet.named_parameters() if n in base)


def _bench_script():
    from dragexp.performance import bench

    return bench


@pytest.mark.parametrize("method", ["dragdiffusion", "dragnoise", "easydrag", "dragondiffusion"])
def test_quick_bench_shortens_each_method_to_a_valid_run(method):
    """bench.quick: the capped settings still build the method (DragonDiffusion's step indices
    are halved with its schedule, so its plan stays inside the 25 steps)."""
    from hydra.utils import instantiate

    bench = _bench_script()
    full = bench.compose(method, [])
    quick = bench.compose(method, bench.quick_overrides(full))
    built = instantiate(quick.method)
    if method == "dragondiffusion":
        assert (quick.method.n_inference_step, quick.method.guidance_steps) == (25, 15)
        assert len(built.schedule.timesteps) == 25
    else:
        assert quick.method.get("lora_steps", 5) <= 5
        assert quick.method.get("n_pix_step", 10) <= 10
        assert quick.method.n_inference_step == 20


@pytest.mark.slow
def test_bench_script_writes_its_table(tmp_path, capsys):
    """scripts/bench.py: both settings, every stage, forward-equivalents, one JSON."""
    bench = _bench_script()
    out = tmp_path / "b.json"
    report = bench.main(["method=dragnoise", "model=tiny", "data=samples", "bench.quick=true",
                         "method.lora_steps=2",
                         "method.n_pix_step=3", "method.n_inference_step=10",
                         "data.size=[64,64]", f"bench.json={out}"])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    res = saved["methods"]["dragnoise"]
    for name in ("faithful", "fast"):
        stages = res["settings"][name]["stages"]
        assert {"model load", "lora", "inversion", "optimisation", "denoising", "decode",
                "total"} <= set(stages)
        # 7 inversion steps; the LoRA adapter adds its own FLOPs (a lot on the tiny model)
        assert 7 <= stages["inversion"]["unet_forward_equivalents"] < 7 * 1.3
        assert stages["total"]["seconds"] >= stages["lora"]["seconds"] > 0
    faithful, fast = (res["settings"][n]["stages"]["denoising"]["unet_forward_equivalents"]
                      for n in ("faithful", "fast"))
    # 7 plain calls (merged LoRA) at batch 1 (the dropped reference branch) against 7 LoRA
    # calls at batch 2
    assert fast == pytest.approx(7, rel=0.02) and faithful > 2 * fast
    assert res["difference"]["max_pixel_difference"] <= 2
    faithful, fast = (res["settings"][n]["stages"]["inversion"]["launches"]
                      for n in ("faithful", "fast"))
    unit = res["settings"]["fast"]["unet_forward_launches"]
    by_op = res["settings"]["fast"]["unet_forward_launches_by_op"]
    assert sum(by_op.values()) == unit and by_op["convolution"] > 0
    assert fast < faithful and 7 * unit <= fast < 7 * unit * 1.1   # merged LoRA: plain calls
    inversion = res["settings"]["fast"]["stages"]["inversion"]
    price = res["settings"]["fast"]["launch_price_s"]
    assert inversion["launch_bound_seconds"] == pytest.approx(inversion["launches"] * price)
    printed = capsys.readouterr().out
    assert "faithful/fast seconds" in printed and "fwd-eq" in printed


def test_batched_reference_guidance_equals_the_two_calls(tiny):
    """EasyDrag's guided step: one call on [x, x, ref] gives what [x, ref] and x give apart."""
    from dragexp.core.sampling import ReferenceAttentionUNet, ReferenceGuidance

    g = torch.Generator().manual_seed(4)
    latents = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(51)]
    cond, uncond = tiny.encode_prompt("a cat"), tiny.encode_prompt("blurry")
    model = ReferenceAttentionUNet(tiny.unet)
    x = latents[30] + 0.1
    out = {}
    for batched in (False, True):
        calls = _CountCalls(tiny.unet)
        pred = ReferenceGuidance(model, cond, uncond, 4.0, latents, ref_start_step=20,
                                 batched=batched)
        with torch.no_grad():
            out[batched] = pred(x, 381, 30)          # loop index 19 < 20: guided
        calls.handle.remove()
        assert calls.batches == ([3] if batched else [2, 1])
    assert (out[True] - out[False]).abs().max() < 1e-4
    with torch.no_grad():                            # and it is not the unguided prediction
        plain = ReferenceGuidance(model, cond, uncond, 4.0, latents, enabled=False)(x, 381, 30)
    assert (out[True] - plain).abs().max() > 1e-3


def _guidance_problem(tiny):
    from dragexp.methods.dragondiffusion.energy import DecoderFeatureEstimator

    g = torch.Generator().manual_seed(3)
    est = DecoderFeatureEstimator(tiny.unet, tiny.encode_prompt("a photo"), [1, 2])
    x, inv = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    hf, wf = (2 * s for s in est(x, 500)[-1].shape[-2:])
    handle = torch.zeros(1, hf, wf, dtype=torch.bool)
    target = torch.zeros(1, hf, wf, dtype=torch.bool)
    handle[0, 2:5, 2:5], target[0, 5:8, 6:9] = True, True
    other = torch.ones(1, 1, hf, wf, dtype=torch.bool)
    other[..., 1:10, 1:11] = False
    mask_x0 = torch.zeros(64, 64)
    mask_x0[8:40, 8:48] = 1
    return est, x, inv, (mask_x0, handle, target, other, 2000.0, 4, 0.2, 6)


def test_dragon_batched_guidance_equals_the_three_calls(tiny):
    """speed.batch_guidance for DragonDiffusion: one estimator call on [x, x, ref] and one
    backward give the authors' two gradients (three calls, two backward passes), in far
    fewer launches."""
    from dragexp.methods.dragondiffusion.energy import ReferenceLatents, guidance_drag
    from dragexp.performance.profiling import count_flops

    est, x, inv, args = _guidance_problem(tiny)
    with count_flops() as c1:
        with torch.no_grad():
            ref = est(inv, 500)
        a = guidance_drag(est, x, ref, 500, *args)
    with count_flops() as c2:
        b = guidance_drag(est, x, ReferenceLatents(inv), 500, *args, split=True)
    for name in ("guidance", "grad_edit", "grad_content"):
        ta, tb = getattr(a, name), getattr(b, name)
        scale = float(ta.abs().max())
        assert scale > 0 and float((ta - tb).abs().max()) / scale < 1e-4, name
    for name in ("energy_edit", "energy_content"):
        assert float(getattr(b, name)) == pytest.approx(float(getattr(a, name)), rel=1e-5)
    assert c2.launches < 0.75 * c1.launches


@pytest.mark.parametrize("task", ["drag", "move", "paste"])
def test_dragon_batched_guidance_edit_matches_the_faithful_one(tiny, task):
    from dragexp.data.dragon_samples import DragonSamples
    from dragexp.methods.dragondiffusion.method import DragonDiffusionMethod

    s = DragonSamples(1, (64, 64), 0, task=task)[0]
    images = []
    for speed in (SpeedSettings(), SpeedSettings(batch_guidance=True)):
        m = DragonDiffusionMethod(task=task, n_inference_step=6, max_resolution=64,
                                  guidance_steps=4, bank_start_step=1, latent_copy_border="clip")
        torch.manual_seed(0)
        images.append(m.edit(s, tiny, EditContext(speed=speed)).image.astype(int))
    assert np.abs(images[0] - images[1]).max() <= 2
