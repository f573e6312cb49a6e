#!/usr/bin/env python
"""DragonDiffusion timing and memory-bank size: seconds per plain / guided step, whole edits.

    python scripts/bench_dragon_step.py --model sd15_random --size 512 --threads 1
    python scripts/bench_dragon_step.py --model sd15_random --size 512 --whole D D+ --precision 16-mixed

Per-operation rows (each timed ``--repeats`` times after ``--warmup`` untimed calls), on random
latents with the real processors, controller and estimator:

* ``inversion``  - one inversion step: UNet at batch 1, recording the memory bank;
* ``plain``      - one sampling step without guidance: CFG batch 2 with the bank concatenated;
* ``guidance``   - the guidance alone: estimator forward (no grad) on the reference latent,
  estimator forward with grad on the current one, two ``autograd.grad`` calls;
* ``guided``     - plain + guidance (a guided step);
* ``reinversion``- one time-travel re-inversion (batch 1, plain attention).

Extrapolated whole edits (50 steps): D = 50 inversion + 20 plain + 30 guided; D+ = 50 inversion
+ 30 plain + 28 guided (20 steps, 4 of them x3) + 12 re-inversions. The memory bank's size is
measured on the recorded step and computed from the UNet's shapes for all steps.
``--whole`` also runs complete edits through :class:`DragonDiffusionMethod` on a built-in sample.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - t0) / max(repeats, 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "sd15_random"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", nargs="+", default=["32-true"],
                    choices=["32-true", "16-mixed", "bf16-mixed"], help="one run per value")
    ap.add_argument("--whole", nargs="*", default=[], help="algs to run as whole edits (D, D+)")
    ap.add_argument("--skip-ops", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from dragexp.methods.dragondiffusion.regions import process_drag
    from dragexp.methods.dragondiffusion.energy import DecoderFeatureEstimator, guidance_drag
    from dragexp.methods.dragondiffusion.image_prompt import dragon_attention
    from dragexp.methods.dragondiffusion.memory_bank import (DragonAttentionControl, MemoryBank,
                                                             bank_size_bytes,
                                                             decoder_self_attention_layers)
    from dragexp.methods.base import autocast_for
    from dragexp.models import build_sd15_random, build_tiny
    from dragexp.core.sampling import NoisePredictor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    models = (build_sd15_random(0) if args.model == "sd15_random" else build_tiny(0, args.size)).to(device)
    out = dict(model=args.model, size=args.size, device=torch.cuda.get_device_name() if device.type == "cuda"
               else f"cpu x{torch.get_num_threads()} threads",
               seconds_model_build=round(time.perf_counter() - t0, 1))
    out["runs"] = {}
    for precision in args.precision:
        res = out["runs"][precision] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        unet = models.unet
        h = w = args.size // 8
        steps = 50
        res["memory_bank_bytes_all_50_steps_fp32"] = bank_size_bytes(unet, (h, w), steps)
        res["memory_bank_bytes_45_steps_fp32"] = bank_size_bytes(unet, (h, w), 45)
        res["memory_bank_bytes_45_steps_fp16"] = bank_size_bytes(unet, (h, w), 45, 1, 2)
        autocast = autocast_for(precision, device)

        if not args.skip_ops:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 4, h, w, generator=g).to(device)
            ref = torch.randn(1, 4, h, w, generator=g).to(device)
            d = unet.config.cross_attention_dim
            cond = torch.randn(1, 77, d, generator=g).to(device)
            uncond = torch.randn(1, 77, d, generator=g).to(device)
            bank = MemoryBank()
            ctl = DragonAttentionControl(decoder_self_attention_layers(unet), bank, "drag", (5, None))
            est = DecoderFeatureEstimator(unet, cond, (1, 2), ctl.plain)
            import numpy as np

            mask = np.zeros((args.size, args.size), np.uint8)
            mask[args.size // 4: 3 * args.size // 4, args.size // 4: 3 * args.size // 4] = 255
            c = args.size // 2
            regions = process_drag(mask, [(c, c), (c + 40, c), (c - 40, c - 20), (c - 10, c - 20)],
                                   (args.size, args.size), 1.0, 4.0)
            inv = NoisePredictor(unet, cond)
            cfg = NoisePredictor(unet, cond, uncond, 4.0)
            with torch.no_grad(), dragon_attention(unet, ctl), autocast:
                def inversion():
                    ctl.set("record", 10)
                    return inv(x, 201, 10)

                def plain():
                    ctl.set("sample", 10)
                    return cfg(x, 781, 10)

                def guidance():
                    ctl.set("plain", 10)
                    with torch.no_grad():
                        r = est(ref, 781)
                    return guidance_drag(est, x, r, 781, regions.mask_x0.to(device),
                                         regions.handle_patches.to(device),
                                         regions.target_patches.to(device),
                                         regions.mask_other.to(device), 2000.0, 4, 0.2, 6)

                def reinversion():
                    ctl.set("plain", 22)
                    return inv(x, 521, 22)

                rows = {}
                rows["inversion"] = _time(inversion, args.repeats, args.warmup)
                res["memory_bank_bytes_one_step_measured"] = bank.nbytes
                rows["plain"] = _time(plain, args.repeats, args.warmup)
                rows["guidance"] = _time(guidance, args.repeats, args.warmup)
                rows["guided"] = rows["plain"] + rows["guidance"]
                rows["reinversion"] = _time(reinversion, args.repeats, args.warmup)
            if device.type == "cuda":
                res["peak_gpu_gib_ops"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            res["seconds_per_op"] = {k: round(v, 3) for k, v in rows.items()}
            res["extrapolated_whole_edit_seconds"] = {
                "D": round(50 * rows["inversion"] + 20 * rows["plain"] + 30 * rows["guided"], 1),
                "D+": round(50 * rows["inversion"] + 30 * rows["plain"] + 28 * rows["guided"]
                            + 12 * rows["reinversion"], 1),
            }
            bank.clear()

        if args.whole:
            from dragexp.data.dragon_samples import DragonSamples
            from dragexp.methods.base import EditContext
            from dragexp.methods.dragondiffusion.method import DragonDiffusionMethod

            sample = DragonSamples(1, (args.size, args.size), 0, task="drag")[0]
            res["whole_edit"] = {}
            for alg in args.whole:
                m = DragonDiffusionMethod(task="drag", alg=alg, max_resolution=args.size,
                                          latent_copy_border="clip")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                torch.manual_seed(0)
                t0 = time.perf_counter()
                r = m.edit(sample, models, EditContext(precision=precision))
                _sync()
                row = dict(seconds_wall=round(time.perf_counter() - t0, 2),
                           timings={k: round(v, 2) for k, v in r.timings.items()},
                           guided_calls=r.num_steps, unet_calls=r.extras["unet_calls"],
                           memory_bank_bytes=r.extras["memory_bank_bytes"])
                if device.type == "cuda":
                    row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                res["whole_edit"][alg] = row
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
