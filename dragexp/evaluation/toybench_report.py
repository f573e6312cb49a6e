"""The toybench table and plot: every run below a folder scored against the ground truth.

One row per run (per method, or per swept setting) with the means of
:mod:`dragexp.evaluation.ground_truth` over its samples, and a first row "no edit" (the unedited
sources scored the same way: where an edit that does nothing lands). Columns:

- ``object_error_px``: the dragged object's distance from its true place in the output;
- ``error_fraction``: that distance over the handle-target distance (0 = on target, 1 = never
  moved): the share of the drag still to go;
- ``psnr_gt`` / ``ssim_gt``: the output against the ground-truth image;
- ``psnr_outside_mask``: the output against the source where nothing may change;
- ``seconds_per_edit``.

Written as ``toybench_table.csv`` and ``toybench.png`` (object error against PSNR, one point per
row) and printed as a Markdown table. :class:`ToyBenchReport` does it when an
``experiment=toybench`` sweep ends; ``python scripts/toybench_report.py DIR`` for any folder.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from hydra.experimental.callback import Callback

from ..reporting.summary import collect

__all__ = ["toybench_rows", "write_toybench_report", "format_table", "ToyBenchReport"]

COLUMNS = ["row", "num_samples", "object_error_px", "error_fraction", "psnr_gt", "ssim_gt",
           "psnr_outside_mask", "seconds_per_edit"]


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def toybench_rows(root: str | Path) -> list[dict]:
    """The table's rows for every run below ``root`` that has ground-truth metrics."""
    runs = [r for r in collect(root) if "gt_object_error_px" in r]
    if not runs:
        return []
    first = runs[0]
    init = _num(first.get("mean_initial_distance_px"))
    rows = [dict(row="no edit", num_samples=first.get("gt_num_samples"),
                 object_error_px=_num(first.get("gt_noedit_object_error_px")),
                 error_fraction=_num(first.get("gt_noedit_object_error_px")) / init,
                 psnr_gt=_num(first.get("gt_noedit_psnr_gt")),
                 ssim_gt=_num(first.get("gt_noedit_ssim_gt")), psnr_outside_mask=math.inf,
                 seconds_per_edit=0.0)]
    for r in runs:
        label = r["setting"] if len(runs) > 1 else r.get("method", r["setting"])
        rows.append(dict(
            row=label, num_samples=r.get("gt_num_samples"),
            object_error_px=_num(r.get("gt_object_error_px")),
            error_fraction=_num(r.get("gt_object_error_px")) / _num(r.get("mean_initial_distance_px")),
            psnr_gt=_num(r.get("gt_psnr_gt")), ssim_gt=_num(r.get("gt_ssim_gt")),
            psnr_outside_mask=_num(r.get("gt_psnr_outside_mask")),
            seconds_per_edit=_num(r.get("seconds_total"))))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`toybench_rows`."""
    head = ("| run | samples | object error (px) | of the drag | PSNR vs truth (dB) | SSIM | "
            "PSNR outside mask (dB) | s / edit |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['row']} | {r['num_samples']} | {r['object_error_px']:.2f} | "
                     f"{r['error_fraction']:.0%} | {r['psnr_gt']:.2f} | {r['ssim_gt']:.3f} | "
                     f"{r['psnr_outside_mask']:.2f} | {r['seconds_per_edit']:.1f} |")
    return "\n".join(lines)


def write_toybench_report(root: str | Path) -> tuple[Path, Path] | None:
    """Writes ``toybench_table.csv`` and ``toybench.png`` in ``root`` and prints the table."""
    root = Path(root)
    rows = toybench_rows(root)
    if not rows:
        return None
    table = root / "toybench_table.csv"
    with table.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (root / "toybench_table.md").write_text(format_table(rows) + "\n")
    png = root / "toybench.png"
    _plot(rows, png, root.name)
    print(format_table(rows), flush=True)
    return table, png


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        hollow = r["row"] == "no edit"
        ax.scatter(r["object_error_px"], r["psnr_gt"], s=60, marker="s" if hollow else "o",
                   facecolors="none" if hollow else None, edgecolors="k" if hollow else None)
        ax.annotate(r["row"].replace("method=", ""), (r["object_error_px"], r["psnr_gt"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("object's distance from its true place (px, lower is better)")
    ax.set_ylabel("PSNR against the ground truth (dB, higher is better)")
    ax.set_title(f"toybench: {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class ToyBenchReport(Callback):
    """Hydra callback: the toybench table and plot when a run or sweep ends (no-op without
    ground truth)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        write_toybench_report(config.hydra.sweep.dir)

    def on_run_end(self, config, **kwargs) -> None:
        write_toybench_report(config.hydra.run.dir)
