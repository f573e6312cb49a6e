"""Sweep summaries: one CSV row and one plotted point per setting of an ablation.

:class:`SweepSummary` is a Hydra callback: when a multirun ends, it reads every job's
``run_summary.json`` under the sweep directory and writes ``summary.csv`` and ``summary.png``.
``python scripts/summarize.py DIR`` does the same for any folder of runs.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger("dragexp")

COLUMNS = ["setting", "method", "num_done", "num_failed", "mean_initial_distance_px",
           "mean_final_distance_px", "reached_fraction", "mean_num_steps", "seconds_lora",
           "seconds_inversion", "seconds_optimisation", "seconds_denoising", "seconds_total",
           "eval_md", "eval_if", "eval_clip_sim", "eval_protocol",
           # toybench ground truth (dragexp.evaluation.ground_truth): edit, then no-edit baseline
           "gt_object_error_px", "gt_noedit_object_error_px", "gt_psnr_gt", "gt_noedit_psnr_gt",
           "gt_ssim_gt", "gt_psnr_outside_mask", "job_dir"]


def collect(root: str | Path) -> list[dict]:
    """Every job summary below ``root``, ordered by job folder."""
    rows = []
    for f in sorted(Path(root).rglob("run_summary.json"), key=lambda p: _job_key(p.parent)):
        s = json.loads(f.read_text())
        s["job_dir"] = str(f.parent)
        rows.append(s)
    # A setting is named by the overrides that differ between the jobs (the swept values).
    parsed = [dict(o.split("=", 1) for o in (r.get("overrides") or []) if "=" in o) for r in rows]
    keys = sorted({k for p in parsed for k in p})
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    for r, p in zip(rows, parsed):
        r["setting"] = " ".join(f"{k}={p.get(k)}" for k in varying) or Path(r["job_dir"]).name
    return rows


def _job_key(p: Path):
    digits = "".join(ch for ch in p.name if ch.isdigit())
    return (int(digits), p.name) if digits else (10**9, p.name)


def write_summary(root: str | Path, title: str | None = None) -> tuple[Path, Path] | None:
    root = Path(root)
    rows = collect(root)
    if not rows:
        log.warning("no run_summary.json under %s", root)
        return None
    csv_path = root / "summary.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    png = root / "summary.png"
    _plot(rows, png, title or root.name)
    log.info("sweep summary: %s, %s", csv_path, png)
    return csv_path, png


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_short(r["setting"]) for r in rows]
    x = range(len(rows))
    truth = any("gt_object_error_px" in r for r in rows)
    fig, axes = plt.subplots(1, 4 if truth else 3,
                             figsize=(max(9 + 3 * truth, 1.6 * len(rows) * 1.5), 4))
    _before_after(axes[0], rows, ("mean_initial_distance_px", "before"),
                  ("mean_final_distance_px", "after"), "#c33", "handle-target distance (px)")
    axes[1].bar(x, [r.get("mean_num_steps", 0) for r in rows], color="#36c")
    axes[1].set_title("optimisation steps")
    stages = ["seconds_lora", "seconds_inversion", "seconds_optimisation", "seconds_denoising"]
    bottom = [0.0] * len(rows)
    for s in stages:
        vals = [float(r.get(s, 0) or 0) for r in rows]
        axes[2].bar(x, vals, bottom=bottom, label=s.replace("seconds_", ""))
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[2].set_title("seconds per edit")
    axes[2].legend(fontsize=7)
    if truth:
        _before_after(axes[3], rows, ("gt_noedit_object_error_px", "no edit"),
                      ("gt_object_error_px", "edited"), "#2a7",
                      "object's distance from its true place (px)")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _before_after(ax, rows: list[dict], before: tuple[str, str], after: tuple[str, str],
                  colour: str, title: str) -> None:
    """A grey bar per setting for ``before = (key, label)`` with a narrower coloured bar for
    ``after`` in front of it."""
    x = range(len(rows))
    ax.bar(x, [r.get(before[0], 0) for r in rows], color="#bbb", label=before[1])
    ax.bar(x, [r.get(after[0], 0) for r in rows], width=0.5, color=colour, label=after[1])
    ax.set_title(title)
    ax.legend()


def _short(setting: str) -> str:
    """``method.feature_idx=[2,3] method.lr=0.1`` -> ``feature_idx=[2,3]\nlr=0.1``."""
    parts = [p.split("=", 1) for p in setting.split(" ")]
    return "\n".join(f"{k.split('.')[-1]}={v}" if v is not None else k
                     for k, v in ((p[0], p[1] if len(p) > 1 else None) for p in parts))


class SweepSummary(Callback):
    """Hydra callback: write ``summary.csv`` / ``summary.png`` when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if not collect(config.hydra.sweep.dir):
            # Every job failed and said why above; a missing-file warning would only distract.
            log.error("no job of the sweep in %s finished, so there is no summary",
                      config.hydra.sweep.dir)
            return
        write_summary(config.hydra.sweep.dir, title=config.get("experiment_name"))

    def on_run_end(self, config, **kwargs) -> None:
        # A single run that wrote no summary failed, and said why; no second message for it.
        if (Path(config.hydra.run.dir) / "run_summary.json").is_file():
            write_summary(config.hydra.run.dir, title=config.get("experiment_name"))
