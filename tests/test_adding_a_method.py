"""The worked example of docs/ADDING_A_METHOD.md: a FreeDrag-like method made of one tracker
strategy and two config files, run through the same loop as every method."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dragexp.methods.freedrag_like import LineSearchTracker

ROOT = Path(__file__).resolve().parents[1]


def test_line_search_walks_the_line_while_the_feature_follows():
    F0 = torch.zeros(1, 3, 16, 16)
    F0[0, :, 2, 2] = 1.0
    tracker = LineSearchTracker(step=2.0, accept=0.5, lam=0.5)
    handles, targets = torch.tensor([[2.0, 2.0]]), torch.tensor([[2.0, 9.0]])
    path = []
    for _ in range(6):
        # the content sits wherever the handle is: every step is accepted
        F1 = torch.zeros(1, 3, 16, 16)
        F1[0, :, int(handles[0, 0]), int(handles[0, 1])] = 1.0
        handles = tracker(F0, F1, torch.tensor([[2.0, 2.0]]), handles, targets)
        path.append(handles[0].tolist())
    assert path[:4] == [[2.0, 4.0], [2.0, 6.0], [2.0, 8.0], [2.0, 9.0]]
    assert path[-1] == [2.0, 9.0]
    # content that did not come along: the handle waits
    stuck = tracker(F0, torch.zeros(1, 3, 16, 16), torch.tensor([[2.0, 2.0]]),
                    torch.tensor([[2.0, 4.0]]), targets)
    assert stuck.tolist() == [[2.0, 4.0]]


def test_line_search_refuses_bad_settings():
    with pytest.raises(ValueError, match="step > 0"):
        LineSearchTracker(step=0)


def test_freedrag_like_runs_from_its_configs(tmp_path):
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, "scripts/train.py", f"hydra.run.dir={tmp_path / 'run'}",
           f"paths.lora_cache={tmp_path / 'lora'}", "method=freedrag_like", "logger=none",
           "model=tiny", "model.resolution=64", "data=samples", "data.size=[64,64]", "data.n=1",
           "method.lora_steps=0", "method.n_pix_step=6", "method.inversion_strength=0.1",
           "callbacks.tracking.tracker.accept=1e9", "progress=false"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    sample = next((tmp_path / "run" / "results").iterdir())
    info = json.loads((sample / "result.json").read_text())
    assert info["method"] == "freedrag_like"
    saved = json.loads((sample / "trajectory.json").read_text())
    traj, target = saved["handles"], saved["targets"][0]
    # accept=1e9 takes every step: at most 2 grid cells (4 image px on the half-size grid) at
    # a time, straight towards the target, never a search's sideways jump
    steps = [math.dist(a[0], b[0]) for a, b in zip(traj, traj[1:])]
    assert steps and max(steps) <= 4 * math.sqrt(2) + 1e-6, steps
    assert any(s > 0 for s in steps), steps
    left = [math.dist(h[0], target) for h in traj]
    assert all(b <= a + 1e-6 for a, b in zip(left, left[1:])), left
