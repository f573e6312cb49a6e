#!/usr/bin/env python
"""Seconds per drag-optimisation step and peak memory: DragDiffusion, DragNoise, EasyDrag.

    python scripts/bench_drag_step.py --model tiny --size 128 --steps 5
    python scripts/bench_drag_step.py --model sd15_random --size 512 --steps 2 --threads 1

Runs the real DragOptimisation module with a fresh Trainer and the real callbacks on random
latents; the first step (warm-up, F0; for EasyDrag also the auto mask's extra backward) is
excluded from the mean. Rows:

* ``latent``     - DragDiffusion: one UNet forward + backward, features at half resolution;
* ``bottleneck`` - DragNoise: the decoder only, from the optimised mid-block output;
* ``easydrag``   - EasyDrag: batch 2 ``[z_t, frozen z_t]`` with reference attention in the
  decoder self-attention, features ``up_blocks[1,2]`` upsampled to image resolution, cosine
  losses, next-point tracking and the auto mask.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per row; on the CPU each row runs in
its own process and reports its peak resident set size (``ru_maxrss``) and the resident size
with the models loaded, before the fit. Prints a table; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import lightning as L
import torch

TARGETS = ("latent", "bottleneck", "easydrag")


class StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, *args):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def _rss_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def bench(models, target_name: str, size: int, steps: int, precision: str) -> dict:
    from dragexp.callbacks import AutoMask, PointTracking, StopWhenReached
    from dragexp.core.features import concat_then_resize
    from dragexp.modules.drag_optimisation import (CosineDragObjective, DragObjective,
                                                   DragOptimisation, fit_drag)
    from dragexp.core.schedule import DDIMSchedule
    from dragexp.methods.latent_drag.bottleneck import BottleneckTarget
    from dragexp.drag.targets import LatentTarget
    from dragexp.methods.easydrag.reference import ReferenceLatentTarget
    from dragexp.drag.trackers import NextPointTracker

    h = w = size // 8
    torch.manual_seed(0)
    device = models.device
    z = torch.randn(1, 4, h, w, device=device)
    text = models.encode_prompt("a photo")
    sched = DDIMSchedule.sd15()
    timer = StepTimer()
    if target_name == "easydrag":
        sh, sw = size, size                                  # image-resolution supervision
        handles = torch.tensor([[sh * 0.5, sw * 0.3]], device=device)
        targets = torch.tensor([[sh * 0.5, sw * 0.8]], device=device)
        module = DragOptimisation(models.unet, ReferenceLatentTarget(), z, 681, text, handles,
                                  targets, torch.zeros(1, 1, sh, sw, device=device), sched, [2, 3],
                                  CosineDragObjective(), 0.01, steps + 1,
                                  compose_features=concat_then_resize)
        callbacks = [PointTracking(NextPointTracker(), start_step=0), StopWhenReached(1.0),
                     AutoMask(), timer]
    else:
        sh, sw = size // 2, size // 2
        handles = torch.tensor([[sh * 0.5, sw * 0.3]], device=device)
        targets = torch.tensor([[sh * 0.5, sw * 0.8]], device=device)   # far: never stops
        target = LatentTarget() if target_name == "latent" else BottleneckTarget()
        module = DragOptimisation(models.unet, target, z, 681, text, handles, targets,
                                  torch.zeros(1, 1, sh, sw, device=device), sched, [3],
                                  DragObjective(mask_term="always"), 0.01, steps + 1)
        callbacks = [PointTracking(), StopWhenReached(), timer]
    rss_before = _rss_gib()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fit_drag(module, callbacks, precision=precision, progress=False)
    total = time.perf_counter() - t0
    per = timer.times[1:]
    row = dict(target=target_name, size=size, steps=len(per),
               seconds_per_step=sum(per) / len(per), seconds_first_step=timer.times[0],
               seconds_fit=total)
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_above_models_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        row["rss_models_gib"] = rss_before
    return row


def load(model: str, device: torch.device):
    from dragexp.models import build_sd15_random, build_tiny

    return (build_tiny() if model == "tiny" else build_sd15_random()).to(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "sd15_random"])
    ap.add_argument("--size", type=int, default=None, help="image side (default: model resolution)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated rows")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # child: one row as JSON
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [t for t in args.targets.split(",") if t]
    for t in names:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r} (known: {', '.join(TARGETS)})")

    if args.one:
        models = load(args.model, device)
        print("ROW " + json.dumps(bench(models, args.one, args.size or models.resolution,
                                        args.steps, args.precision)), flush=True)
        return
    if device.type == "cpu":   # one process per row: ru_maxrss is a per-process peak
        rows = []
        for t in names:
            cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                   "--precision", args.precision, "--one", t]
            cmd += ["--size", str(args.size)] if args.size else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")), None)
            if line is None:
                sys.exit(f"row {t} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[4:]))
        dev = f"CPU x{args.threads or torch.get_num_threads()} threads"
    else:
        models = load(args.model, device)
        rows = [bench(models, t, args.size or models.resolution, args.steps, args.precision)
                for t in names]
        dev = torch.cuda.get_device_name()
    size = rows[0]["size"]
    mem = "peak_gib" if device.type == "cuda" else "peak_rss_gib"
    print(f"\nmodel={args.model} size={size} device={dev} precision={args.precision}")
    print(f"{'optimised':<12} {'s/step':>10} {'first step':>11} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['target']:<12} {r['seconds_per_step']:>10.4f} {r['seconds_first_step']:>11.4f}"
              f" {r[mem]:>9.2f}")
    by = {r["target"]: r for r in rows}
    if "latent" in by and "bottleneck" in by:
        print(f"speed-up of the bottleneck step: "
              f"{by['latent']['seconds_per_step'] / by['bottleneck']['seconds_per_step']:.2f}x")
    if "latent" in by and "easydrag" in by:
        print(f"EasyDrag step / DragDiffusion step: "
              f"{by['easydrag']['seconds_per_step'] / by['latent']['seconds_per_step']:.2f}x time, "
              f"{by['easydrag'][mem] / by['latent'][mem]:.2f}x peak memory")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(model=args.model, device=dev, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
