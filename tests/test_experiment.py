"""End to end through scripts/train.py on the tiny model: outputs, W&B, ablations, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# The random tiny model: these tests check the pipeline, not the edit (test_toybench does).
QUICK = ["model=tiny", "model.resolution=64", "method.lora_steps=2", "method.lora_batch_size=1",
         "method.n_pix_step=3", "method.inversion_strength=0.1", "progress=false"]
FAST = QUICK + ["data=samples", "data.size=[64,64]", "data.n=1"]


def train(tmp: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    cmd = [sys.executable, "scripts/train.py", f"{key}={tmp / 'run'}",
           f"paths.lora_cache={tmp / 'lora'}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_default_job_writes_results_and_wandb(tmp_path):
    p = train(tmp_path, *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    sample = next((run / "results").iterdir())
    for f in ("dragged_image.png", "source_annotated.png", "comparison.png", "trajectory.json",
              "result.json"):
        assert (sample / f).is_file(), f
    info = json.loads((sample / "result.json").read_text())
    img = np.asarray(Image.open(sample / "dragged_image.png"))
    assert img.shape[:2] == tuple(info["size"])
    assert {"lora", "inversion", "optimisation", "denoising", "decode"} <= set(info["timings"])
    assert info["lora_path"] and Path(info["lora_path"]).is_file()
    traj = json.loads((sample / "trajectory.json").read_text())
    assert len(traj["handles"]) >= 1 and len(traj["loss"]) == info["num_steps"]
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run written"
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["num_done"] == 1 and summary["num_failed"] == 0

    # Same command again: the sample is complete, so nothing is redone and the LoRA is reused.
    before = (sample / "result.json").stat().st_mtime_ns
    p2 = train(tmp_path, *FAST)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert (sample / "result.json").stat().st_mtime_ns == before


def test_ablate_block_is_a_sweep_with_summary(tmp_path):
    p = train(tmp_path, "experiment=ablate_block", "logger=none", *FAST,
              "method.feature_idx=choice([2],[3])", multirun=True)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [r["setting"] for r in rows] == ["method.feature_idx=[2]", "method.feature_idx=[3]"]
    assert all(r["num_done"] == "1" for r in rows)
    assert (run / "summary.png").is_file()
    assert len(list(run.glob("*/results/*/dragged_image.png"))) == 2


def test_bad_sample_is_recorded_and_others_finish(tmp_path):
    from dragexp.data import DragSample, write_sample_folder

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    # sides that are not multiples of 8: the VAE floors, the result is resized back
    odd = rng.integers(0, 255, (67, 75, 3), dtype=np.uint8)
    good = DragSample("a_good", odd, [(20, 20), (30, 20)], np.zeros((67, 75), np.uint8), "x")
    write_sample_folder(good, tmp_path / "edits" / "a_good")
    bad = tmp_path / "edits" / "b_bad"
    write_sample_folder(DragSample("b_bad", img, [(20, 20), (30, 20)],
                                   np.zeros((64, 64), np.uint8), "x"), bad)
    (bad / "drag.yaml").write_text("points: [[20, 20], [30, 20], [5, 5]]\n")
    p = train(tmp_path, *QUICK, "logger=none", "data=folder", f"data.root={tmp_path / 'edits'}")
    assert p.returncode == 0, p.stderr[-3000:]
    errors = json.loads((tmp_path / "run" / "errors.json").read_text())
    assert [e["name"] for e in errors] == ["b_bad"] and "points" in errors[0]["error"]
    out = np.asarray(Image.open(tmp_path / "run" / "results" / "a_good" / "dragged_image.png"))
    assert out.shape == (67, 75, 3)


def test_unknown_config_name_is_a_clear_error(tmp_path):
    p = train(tmp_path, "method=does_not_exist")
    assert p.returncode != 0 and "does_not_exist" in p.stderr


def test_dragnoise_refuses_top_left_handle_by_default(tmp_path):
    from dragexp.data import DragSample, write_sample_folder

    img = np.full((64, 64, 3), 128, np.uint8)
    write_sample_folder(DragSample("edge", img, [(2, 30), (20, 30)], np.zeros((64, 64), np.uint8),
                                   "x"), tmp_path / "edits" / "edge")
    p = train(tmp_path, *QUICK, "logger=none", "method=dragnoise", "data=folder",
              f"data.root={tmp_path / 'edits'}")
    # Its only sample failed, so the run fails, with the sample's message.
    assert p.returncode != 0 and "tracker.border=clip" in p.stderr
    errors = json.loads((tmp_path / "run" / "errors.json").read_text())
    assert "edge" in errors[0]["error"] and "tracker.border=clip" in errors[0]["error"]


def test_dragnoise_clip_switch_and_optimised_feature_ablation(tmp_path):
    from dragexp.data import DragSample, write_sample_folder

    img = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    write_sample_folder(DragSample("edge", img, [(2, 30), (20, 30)], np.zeros((64, 64), np.uint8),
                                   "x"), tmp_path / "edits" / "edge")
    p = train(tmp_path, *QUICK, "logger=none", "experiment=ablate_optimised_feature",
              "method.target=choice(bottleneck,feature1)",
              "callbacks.tracking.tracker.border=clip",
              "data=folder", f"data.root={tmp_path / 'edits'}", multirun=True)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "run" / "summary.csv").open()))
    assert [r["setting"] for r in rows] == ["method.target=bottleneck", "method.target=feature1"]
    assert all(r["num_done"] == "1" and r["method"] == "dragnoise" for r in rows)


class _Refused:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_run_where_every_sample_failed_exits_non_zero_naming_the_file(tmp_path):
    import pickle

    sample = tmp_path / "bench" / "animals" / "evil"
    sample.mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(sample / "original_image.png")
    meta = {"prompt": "x", "points": [[1, 1], [2, 2]], "mask": _Refused()}
    (sample / "meta_data.pkl").write_bytes(pickle.dumps(meta, protocol=4))
    p = train(tmp_path, *QUICK, "logger=none", "data=dragbench", f"data.root={tmp_path / 'bench'}")
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "no sample succeeded" in out and str(sample / "meta_data.pkl") in out
    # What was computed is still written: the summary and the error record.
    errors = json.loads((tmp_path / "run" / "errors.json").read_text())
    assert [e["name"] for e in errors] == ["animals/evil"]
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["num_failed"] == 1


def test_partial_failure_exits_zero_and_says_how_many_failed(tmp_path):
    from dragexp.data import DragSample, write_sample_folder

    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for name in ("a_good", "b_bad"):
        write_sample_folder(DragSample(name, img, [(20, 20), (30, 20)],
                                       np.zeros((64, 64), np.uint8), "x"), tmp_path / "edits" / name)
    (tmp_path / "edits" / "b_bad" / "drag.yaml").write_text("points: [[20, 20]]\n")
    p = train(tmp_path, *QUICK, "logger=none", "data=folder", f"data.root={tmp_path / 'edits'}")
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "1 of 2 samples failed, see" in out and "errors.json" in out
    # Again: the finished sample is skipped, and the run says so.
    again = train(tmp_path, *QUICK, "logger=none", "data=folder", f"data.root={tmp_path / 'edits'}")
    assert again.returncode == 0
    assert "skipping 1 finished samples" in again.stdout + again.stderr


def test_missing_dragbench_root_says_what_to_pass(tmp_path):
    p = train(tmp_path, "experiment=paper/dragdiffusion_v1_inversion_step", "model=tiny",
              "data.limit=1", "logger=none", multirun=True)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "data.root is not set" in out and "data.root=/path/to/DragBench" in out
    assert "data=samples" in out and "Traceback" not in out


def test_the_same_command_goes_on_in_its_unfinished_run(tmp_path):
    """No hydra.run.dir given: the same command again finds its own stopped run (same
    overrides, no run_summary.json) and finishes it, in the same folder and the same W&B run;
    a finished run is left alone and the next command starts a new folder."""
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"paths.lora_cache={tmp_path / 'lora'}",
           *QUICK, "data=samples", "data.size=[64,64]", "data.n=2"]

    def runs():
        return sorted((tmp_path / "outputs" / "dragdiffusion").iterdir())

    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    [run] = runs()
    wandb_id = (run / "wandb_run_id.txt").read_text().strip()
    # As if stopped after the first sample: no summary, the second sample not written.
    (run / "run_summary.json").unlink()
    first, second = sorted((run / "results").iterdir())
    import shutil

    shutil.rmtree(second)
    kept = (first / "result.json").stat().st_mtime_ns

    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert runs() == [run]
    assert "skipping 1 finished samples" in p.stdout + p.stderr
    assert (first / "result.json").stat().st_mtime_ns == kept and (second / "result.json").is_file()
    assert json.loads((run / "run_summary.json").read_text())["num_done"] == 2
    parts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(p.name.endswith(wandb_id) for p in parts)

    # Finished: the same command makes a new run; so does resume=false.
    p = subprocess.run([*cmd, "logger=none"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(runs()) == 2 and "skipping" not in p.stdout + p.stderr
