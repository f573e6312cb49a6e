"""Per-sample results on disk, written atomically.

Layout (one folder per sample, the layout community evaluators read):
``<out>/<sample name>/dragged_image.png``, ``source_annotated.png`` (handles, targets and the
handle trajectories drawn), ``comparison.png``, ``trajectory.json``, ``result.json``; for a
sample with a known true result (toybench) also ``ground_truth.png`` and the edit's
ground-truth metrics in ``result.json``.
A sample's folder is written under a temporary name and renamed, so a run killed at any moment
leaves either a complete sample or none.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .drawing import draw_drag, side_by_side

RESULT_FILE = "result.json"


def sample_dir(out: str | Path, name: str) -> Path:
    return Path(out) / name


def is_done(out: str | Path, name: str) -> bool:
    """A sample counts as done once its folder with ``result.json`` exists (atomic rename)."""
    return (sample_dir(out, name) / RESULT_FILE).is_file()


def staging_dir(final: Path) -> Path:
    """A hidden empty folder beside ``final`` to write into and then rename to ``final`` (so a
    folder is complete or absent), with the permissions of the user's umask: ``mkdtemp``
    makes it 0700, which the finished folder must not keep."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def write_result(out: str | Path, sample, result, extra: dict | None = None) -> Path:
    """Write one edit's files into ``<out>/<sample.name>/`` atomically; returns that folder."""
    final = sample_dir(out, sample.name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(final)
    try:
        Image.fromarray(result.image).save(tmp / "dragged_image.png")
        truth = (getattr(sample, "extras", None) or {}).get("ground_truth")
        if truth is not None:   # toybench: the true edited image, and the edit scored against it
            Image.fromarray(truth["image"]).save(tmp / "ground_truth.png")
        traj_lists = _per_handle(result.trajectory_xy)
        annotated = draw_drag(sample.image, result.handles_xy, result.targets_xy, traj_lists,
                              mask=sample.mask)
        Image.fromarray(annotated).save(tmp / "source_annotated.png")
        reached = result.trajectory_xy[-1] if result.trajectory_xy else result.handles_xy
        edited_marked = draw_drag(result.image, [tuple(p) for p in reached], result.targets_xy)
        panels, titles = [annotated, edited_marked], ["source", "edited"]
        if truth is not None:
            panels.append(draw_drag(truth["image"], [], []))
            titles.append("ground truth")
        Image.fromarray(side_by_side(panels, titles)).save(tmp / "comparison.png")
        (tmp / "trajectory.json").write_text(json.dumps({
            "convention": "handles[k][i] = [x, y] image pixels of handle i after the tracking "
                          "of optimisation step k (k = 0: clicked handles)",
            "handles": result.trajectory_xy,
            "targets": [list(t) for t in result.targets_xy],
            "loss": result.losses,
            "mean_distance_sup": result.distances,
        }, indent=1))
        info = dict(name=sample.name, category=sample.category, prompt=sample.prompt,
                    size=list(sample.image.shape[:2]), num_steps=result.num_steps,
                    stopped_early=result.stopped_early, lora_path=result.lora_path,
                    timings=result.timings, final_distance_px=final_distance(result),
                    initial_distance_px=initial_distance(result), **(extra or {}))
        if truth is not None:
            info["ground_truth"] = ground_truth_block(result.image, sample)
        metrics = (getattr(result, "extras", None) or {}).get("metrics")
        if metrics:   # a method's own per-sample numbers, e.g. an analysis' reconstruction error
            info["metrics"] = {k: float(v) for k, v in metrics.items()}
        images = (getattr(result, "extras", None) or {}).get("images", {})
        if images:   # method/callback images, e.g. the auto-mask sequence: images/<name>.png
            (tmp / "images").mkdir()
            for key, img in images.items():
                Image.fromarray(img).save(tmp / "images" / f"{key}.png")
            info["images"] = sorted(f"images/{key}.png" for key in images)
        (tmp / RESULT_FILE).write_text(json.dumps(info, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def ground_truth_block(image: np.ndarray, sample) -> dict:
    """``result.json``'s ``ground_truth``: :mod:`dragexp.evaluation.ground_truth` metrics of the
    edit and of the unedited source (the no-edit baseline); ``inf`` is written as null."""
    from ..evaluation.ground_truth import ground_truth_metrics

    truth = sample.extras["ground_truth"]

    def finite(m: dict) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in m.items()}

    return dict(edit=truth.get("edit"),
                edited=finite(ground_truth_metrics(image, sample.image, sample.mask, truth)),
                no_edit=finite(ground_truth_metrics(sample.image, sample.image, sample.mask,
                                                    truth)))


def _per_handle(traj: list[list[list[float]]]) -> list[list[tuple[float, float]]]:
    if not traj:
        return []
    return [[tuple(step[i]) for step in traj] for i in range(len(traj[0]))]


def _mean_dist(handles, targets) -> float:
    h, t = np.asarray(handles, float), np.asarray(targets, float)
    return float(np.linalg.norm(h - t, axis=-1).mean()) if len(h) else float("nan")


def final_distance(result) -> float:
    """Mean tracked handle-to-target distance after the optimisation, in image pixels."""
    last = result.trajectory_xy[-1] if result.trajectory_xy else result.handles_xy
    return _mean_dist(last, result.targets_xy)


def initial_distance(result) -> float:
    return _mean_dist(result.handles_xy, result.targets_xy)


def write_json_atomic(path: str | Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
