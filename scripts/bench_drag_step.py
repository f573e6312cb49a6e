#!/usr/bin/env python
"""Seconds per drag-optimisation step: DragDiffusion (latent) vs DragNoise (bottleneck).

    python scripts/bench_drag_step.py --model tiny --size 128 --steps 5
    python scripts/bench_drag_step.py --model sd15_random --size 512 --steps 3

Runs the real DragOptimisation module with a fresh Trainer and the real callbacks on random
latents; the first step (warm-up, F0) is excluded. Prints a table and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch

from dragexp.callbacks import PointTracking, StopWhenReached
from dragexp.modules.drag_optimisation import DragObjective, DragOptimisation, fit_drag
from dragexp.schedule import DDIMSchedule
from dragexp.targets import BottleneckTarget, LatentTarget


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


def bench(models, target, size: int, steps: int, precision: str) -> dict:
    h = w = size // 8
    torch.manual_seed(0)
    device = models.device
    z = torch.randn(1, 4, h, w, device=device)
    text = models.encode_prompt("a photo")
    sh, sw = size // 2, size // 2
    handles = torch.tensor([[sh * 0.5, sw * 0.3]])
    targets = torch.tensor([[sh * 0.5, sw * 0.8]])       # far: the stop rule never fires
    mask = torch.zeros(1, 1, sh, sw)
    sched = DDIMSchedule.sd15()
    timer = StepTimer()
    module = DragOptimisation(models.unet, target, z, 681, text, handles, targets, mask, sched,
                              [3], DragObjective(mask_term="always"), 0.01, steps + 1)
    t0 = time.perf_counter()
    fit_drag(module, [PointTracking(), StopWhenReached(), timer], precision=precision,
             progress=False)
    total = time.perf_counter() - t0
    per = timer.times[1:]
    return dict(target=target.name, size=size, steps=len(per),
                seconds_per_step=sum(per) / len(per), seconds_first_step=timer.times[0],
                seconds_fit=total)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "sd15_random"])
    ap.add_argument("--size", type=int, default=None, help="image side (default: model resolution)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from dragexp.models import build_sd15_random, build_tiny

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = (build_tiny() if args.model == "tiny" else build_sd15_random()).to(device)
    size = args.size or models.resolution
    rows = [bench(models, t, size, args.steps, args.precision)
            for t in (LatentTarget(), BottleneckTarget())]
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"\nmodel={args.model} size={size} device={dev} precision={args.precision}")
    print(f"{'optimised':<12} {'s/step':>10} {'first step':>11}")
    for r in rows:
        print(f"{r['target']:<12} {r['seconds_per_step']:>10.4f} {r['seconds_first_step']:>11.4f}")
    print(f"speed-up of the bottleneck step: {rows[0]['seconds_per_step'] / rows[1]['seconds_per_step']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(model=args.model, device=dev, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
