"""Scale-out with real processes: GPU-pinning launcher, SIGKILL + resume, shards merged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "data=samples", "model.resolution=64", "data.size=[64,64]", "method.lora_steps=2",
        "method.lora_batch_size=1", "method.n_pix_step=3", "method.inversion_strength=0.1",
        "progress=false", "logger=none"]


def cmd(run_dir: Path, lora: Path, *overrides: str, key: str = "hydra.run.dir") -> list[str]:
    flags = [o for o in overrides if o.startswith("-")]
    rest = [o for o in overrides if not o.startswith("-")]
    return [sys.executable, "scripts/train.py", *flags, f"{key}={run_dir}",
            f"paths.lora_cache={lora}", *TINY, *rest]


ENV = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1")


def run(args, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900, **kw)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def images(run_dir: Path) -> dict[str, bytes]:
    from PIL import Image
    import numpy as np

    return {p.parent.name: np.asarray(Image.open(p)).tobytes()
            for p in sorted((run_dir / "results").glob("*/dragged_image.png"))}


def test_gpu_launcher_pins_one_device_per_concurrent_job(tmp_path):
    run(cmd(tmp_path / "sweep", tmp_path / "lora", "-m", "data.n=1",
            "method.n_pix_step=1,2,3", "hydra/launcher=gpus", "hydra.launcher.devices=[7,9]",
            key="hydra.sweep.dir"))
    jobs = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("job*/run_summary.json"))]
    assert len(jobs) == 3
    assert {j["cuda_visible_devices"] for j in jobs} <= {"7", "9"}
    for a in jobs:  # jobs running at the same time never share a device
        for b in jobs:
            if a is not b and a["started"] < b["finished"] and b["started"] < a["finished"]:
                assert a["cuda_visible_devices"] != b["cuda_visible_devices"]
    assert (tmp_path / "sweep" / "summary.csv").is_file()
    assert len({j["cuda_visible_devices"] for j in jobs}) == 2  # both devices were used


def test_sigkill_resume_and_shards(tmp_path):
    whole = tmp_path / "whole"
    run(cmd(whole, tmp_path / "lora_whole", "data.n=3"))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed, tmp_path / "lora_killed", "data.n=3"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and len(list(killed.glob("results/*/result.json"))) < 1:
        time.sleep(0.2)
    time.sleep(1.0)  # into the next sample
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "run_summary.json").exists(), "the run finished before it was killed"
    run(cmd(killed, tmp_path / "lora_killed", "data.n=3"))
    summary = json.loads((killed / "run_summary.json").read_text())
    names = [r["name"] for r in summary["samples"]]
    assert sorted(names) == sorted(set(names)) and len(names) == 3
    assert not list((killed / "results").glob(".*"))
    assert images(killed) == images(whole)

    shards = []
    for i in range(2):
        d = tmp_path / f"shard{i}"
        run(cmd(d, tmp_path / "lora_whole", "data.n=3", f"data.shard={i}", "data.num_shards=2"))
        shards.append(str(d))
    run([sys.executable, "scripts/merge_shards.py", str(tmp_path / "merged"), *shards])
    assert images(tmp_path / "merged") == images(whole)
    merged = json.loads((tmp_path / "merged" / "run_summary.json").read_text())
    ref = json.loads((whole / "run_summary.json").read_text())
    for key in ("num_done", "mean_final_distance_px", "mean_num_steps", "reached_fraction"):
        assert merged[key] == ref[key], key
