"""The papers' kinds of plot and table for the ``experiment=paper/*`` runs.

An ``experiment=paper/<name>`` file is a sweep (or a single run) whose config carries a
``paper:`` block saying which of the paper's figures or tables it reproduces and how that is
drawn. When the sweep ends, :class:`PaperFigure` (a Hydra callback registered in
``configs/train.yaml``; a no-op without a ``paper`` block) reads the jobs' ``run_summary.json``
(:func:`dragexp.reporting.summary.collect`) and writes, next to ``summary.csv``:

- ``paper_table.csv``: one row per setting, in the paper's units and names, with the metrics
  the paper reports and, where the paper prints numbers, those numbers beside them
  (``published_<metric>``);
- ``paper_figure.png``: the same kind of plot as the paper.

The ``paper`` block (all keys but ``figure`` optional)::

    paper:
      title: "DragDiffusion (CVPR 2024) Fig. 7(a): inversion step"
      figure: curve        # curve | scatter | bars | steps | grid | categories
      x: method.inversion_strength   # the swept key whose value names a setting
      x_label: inversion step t
      x_scale: 50          # a numeric setting is shown as value * x_scale (t = 50 s)
      labels: {...}        # setting value -> name shown (variants, targets)
      metrics: [eval_md, eval_if]
      published: [{setting: <value>, eval_md: 33.7, ...}, ...]

Metric names are ``run_summary.json`` keys (``eval_md``, ``eval_if``, ``eval_clip_sim``,
``mean_final_distance_px``, ``mean_num_steps``, ``seconds_<stage>``), ``metrics.<k>`` (the mean
of a method's per-sample ``metrics``, e.g. ``metrics.recon_lpips``), or ``seconds_per_step``
(optimisation seconds per optimisation step).

Figures:

- ``curve``: the metrics against the setting, MD and IF on twin axes as in DragDiffusion's
  Fig. 7;
- ``scatter``: IF (y) against MD (x), one point per setting, published points hollow
  (DragDiffusion Fig. 8, DragNoise Fig. 12);
- ``bars``: one panel per metric, a bar per setting, published values as markers (EasyDrag
  Fig. 9 and Table 1, DragNoise Fig. 3);
- ``steps``: loss and mean handle-target distance per optimisation step from every sample's
  ``trajectory.json``, one line per setting (DragNoise Fig. 8);
- ``grid``: the source and each setting's edit, one row per sample (the qualitative ablations);
- ``categories``: per-category MD and IF of a single evaluated run (DragDiffusion Tables 1-2).

``python scripts/summarize.py DIR`` rebuilds both files from the jobs' saved ``config.yaml``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
from hydra.experimental.callback import Callback

from .summary import collect

log = logging.getLogger("dragexp")

__all__ = ["FIGURES", "PaperFigure", "write_paper_figure", "paper_rows", "step_curves"]

FIGURES = ("curve", "scatter", "bars", "steps", "grid", "categories")
_NAMES = {"eval_md": "Mean Distance (px) ↓", "eval_if": "Image Fidelity ↑",
          "eval_clip_sim": "CLIP similarity ↑", "mean_final_distance_px": "tracked distance (px) ↓",
          "mean_num_steps": "optimisation steps", "seconds_total": "seconds per edit",
          "seconds_per_step": "seconds per optimisation step",
          "metrics.recon_mse": "reconstruction MSE ↓", "metrics.recon_lpips": "reconstruction LPIPS ↓"}


def _label(metric: str) -> str:
    return _NAMES.get(metric, metric)


def _wrap(text: str, width: int = 16) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def _num(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f


def _metric(row: dict, name: str) -> float:
    """A row's value of ``name`` (see the module docstring), NaN where it has none."""
    if name == "seconds_per_step":
        steps = _num(row.get("mean_num_steps"))
        return _num(row.get("seconds_optimisation")) / steps if steps and steps > 0 else float("nan")
    if name.startswith("metrics."):
        key = name.split(".", 1)[1]
        vals = [_num((s.get("metrics") or {}).get(key)) for s in row.get("samples", [])]
        vals = [v for v in vals if not math.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")
    return _num(row.get(name))


def _overrides(row: dict) -> dict:
    return {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1]
            for o in (row.get("overrides") or []) if "=" in o}


def _setting(row: dict, spec: dict) -> tuple[str, str]:
    """(raw value of the swept key, name shown) of one job."""
    x = spec.get("x")
    raw = _overrides(row).get(x) if x else None
    if raw is None:
        raw = row.get("setting") or Path(row["job_dir"]).name
    labels = spec.get("labels") or {}
    if str(raw) in labels:
        return str(raw), str(labels[str(raw)])
    scale = spec.get("x_scale")
    if scale is not None and not math.isnan(_num(raw)):
        v = _num(raw) * float(scale)
        return str(raw), f"{v:g}"
    return str(raw), str(raw)


def paper_rows(root: str | Path, spec: dict) -> list[dict]:
    """One row per job below ``root``: setting, its name, the spec's metrics, the published
    numbers for that setting, and the job folder."""
    published = {str(p.get("setting")): p for p in (spec.get("published") or [])}
    metrics = list(spec.get("metrics") or [])
    out = []
    for r in collect(root):
        raw, name = _setting(r, spec)
        row = dict(setting=name, value=raw, method=r.get("method"), num_done=r.get("num_done"),
                   num_failed=r.get("num_failed"))
        for m in metrics:
            row[m] = _metric(r, m)
        pub = published.get(raw, {})
        for m in metrics:
            if m in pub:
                row[f"published_{m}"] = pub[m]
        if "source" in pub:
            row["published_source"] = pub["source"]
        row["job_dir"] = r["job_dir"]
        row["_summary"] = r
        out.append(row)
    return out


def _write_table(rows: list[dict], path: Path) -> None:
    cols = [k for k in rows[0] if not k.startswith("_")]
    for r in rows[1:]:
        cols += [k for k in r if not k.startswith("_") and k not in cols]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})


def write_paper_figure(root: str | Path, spec: dict | None = None) -> tuple[Path, Path] | None:
    """Write ``paper_table.csv`` and ``paper_figure.png`` under ``root`` (a sweep or run
    folder). ``spec`` is the ``paper`` block; None reads it from the first job's
    ``config.yaml``. Returns the two paths, or None when there is nothing to draw."""
    root = Path(root)
    if spec is None:
        spec = _saved_spec(root)
        if spec is None:
            return None
    figure = spec.get("figure")
    if figure not in FIGURES:
        raise ValueError(f"paper.figure must be one of {FIGURES}, got {figure!r}")
    if figure == "categories":
        rows = _category_rows(root, spec)
    else:
        rows = paper_rows(root, spec)
    if not rows:
        log.warning("paper figure: no finished job below %s", root)
        return None
    table = root / "paper_table.csv"
    png = root / "paper_figure.png"
    if figure == "steps":
        curves = {r["setting"]: step_curves(r["_summary"]) for r in rows}
        for r in rows:
            c = curves[r["setting"]]
            r["steps_to_stop"] = c["mean_steps"]
        _write_table(rows, table)
        _plot_steps(curves, png, spec)
    else:
        _write_table(rows, table)
        {"curve": _plot_curve, "scatter": _plot_scatter, "bars": _plot_bars, "grid": _plot_grid,
         "categories": _plot_categories}[figure](rows, png, spec)
    log.info("paper figure: %s, %s", table, png)
    return table, png


def _saved_spec(root: Path) -> dict | None:
    import yaml

    for f in sorted(root.rglob("config.yaml")):
        if ".hydra" in f.parts:
            continue
        spec = (yaml.safe_load(f.read_text()) or {}).get("paper")
        if spec:
            return spec
    return None


# -- per-step curves (trajectory.json) --------------------------------------------------------

def step_curves(summary: dict) -> dict:
    """Mean loss and mean handle-target distance (image pixels) per optimisation step over the
    samples of one job, from their ``trajectory.json``; a sample that stopped early counts at
    the steps it ran. Also ``per_sample`` curves and ``mean_steps``."""
    job = Path(summary["job_dir"])
    per_sample = []
    for s in summary.get("samples", []):
        f = job / "results" / s["name"] / "trajectory.json"
        if not f.is_file():
            continue
        tr = json.loads(f.read_text())
        targets = np.asarray(tr.get("targets") or [], float)
        dist = [float(np.linalg.norm(np.asarray(h, float) - targets, axis=-1).mean())
                for h in tr.get("handles") or []] if len(targets) else []
        per_sample.append(dict(name=s["name"], loss=[float(v) for v in tr.get("loss") or []],
                               distance=dist))

    def mean_curve(key):
        n = max((len(p[key]) for p in per_sample), default=0)
        return [float(np.mean([p[key][k] for p in per_sample if len(p[key]) > k]))
                for k in range(n)]

    steps = [len(p["loss"]) for p in per_sample]
    return dict(loss=mean_curve("loss"), distance=mean_curve("distance"), per_sample=per_sample,
                mean_steps=float(np.mean(steps)) if steps else float("nan"))


# -- plots ----------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: Path, spec: dict, rows: list[dict] | None = None) -> None:
    title = spec.get("title") or ""
    if rows is not None:
        missing = [m for m in spec.get("metrics") or []
                   if all(math.isnan(_num(r.get(m))) for r in rows)]
        if missing:
            title += f"\n(no values for {', '.join(missing)}: evaluate=true computes eval_*)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)


def _xs(rows: list[dict]) -> tuple[list, bool]:
    vals = [_num(r["setting"]) for r in rows]
    numeric = not any(math.isnan(v) for v in vals)
    return (vals if numeric else list(range(len(rows)))), numeric


def _plot_curve(rows, path, spec):
    plt = _plt()
    metrics = list(spec.get("metrics") or ["eval_md", "eval_if"])
    xs, numeric = _xs(rows)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    axes = [ax] + [ax.twinx() for _ in metrics[1:2]]
    colours = ["#1f5fbf", "#d2452f", "#2a9d4b"]
    for k, m in enumerate(metrics[:2]):
        a = axes[k]
        a.plot(xs, [r[m] for r in rows], "o-", color=colours[k], label=_label(m))
        pub = [(x, r.get(f"published_{m}")) for x, r in zip(xs, rows) if f"published_{m}" in r]
        if pub:
            a.plot([p[0] for p in pub], [p[1] for p in pub], "x--", color=colours[k], alpha=0.6,
                   label=f"{_label(m)} (published)")
        a.set_ylabel(_label(m), color=colours[k])
    if not numeric:
        ax.set_xticks(xs)
        ax.set_xticklabels([r["setting"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_xlabel(spec.get("x_label") or spec.get("x") or "setting")
    ax.grid(alpha=0.3)
    handles = [h for a in axes for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
    _finish(fig, path, spec, rows)


def _plot_scatter(rows, path, spec):
    plt = _plt()
    mx, my = (list(spec.get("metrics") or ["eval_md", "eval_if"]) + ["eval_if"])[:2]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for r in rows:
        ax.scatter(r[mx], r[my], s=45)
        ax.annotate(r["setting"], (r[mx], r[my]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    for p in spec.get("published") or []:
        if mx in p and my in p:
            name = (spec.get("labels") or {}).get(str(p.get("setting")), p.get("setting"))
            ax.scatter(p[mx], p[my], s=45, facecolors="none", edgecolors="k")
            ax.annotate(f"{name} (published)", (p[mx], p[my]), fontsize=6, xytext=(4, -8),
                        textcoords="offset points", color="#555")
    ax.set_xlabel(_label(mx))
    ax.set_ylabel(_label(my))
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    _finish(fig, path, spec, rows)


def _plot_bars(rows, path, spec):
    plt = _plt()
    metrics = list(spec.get("metrics") or ["eval_md", "eval_if"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.0 * len(rows)) * len(metrics) * 0.8 + 1, 4),
                             squeeze=False)
    x = list(range(len(rows)))
    for ax, m in zip(axes[0], metrics):
        ax.bar(x, [r[m] for r in rows], color="#4a7fc1")
        pub = [(k, r[f"published_{m}"]) for k, r in enumerate(rows) if f"published_{m}" in r]
        if pub:
            ax.scatter([p[0] for p in pub], [p[1] for p in pub], marker="_", s=400, color="k",
                       label="published", zorder=3)
            ax.legend(fontsize=7)
        ax.set_title(_label(m), fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels([_wrap(r["setting"], 14) for r in rows], rotation=25, ha="right",
                           fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    _finish(fig, path, spec, rows)


def _plot_steps(curves: dict, path: Path, spec: dict) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, (name, c) in enumerate(curves.items()):
        colour = f"C{k}"
        for p in c["per_sample"]:
            if len(c["per_sample"]) > 1:
                axes[0].plot(p["loss"], color=colour, alpha=0.25, lw=0.8)
                axes[1].plot(p["distance"], color=colour, alpha=0.25, lw=0.8)
        axes[0].plot(c["loss"], color=colour, lw=2, label=f"{name} ({c['mean_steps']:g} steps)")
        axes[1].plot(c["distance"], color=colour, lw=2, label=name)
    axes[0].set_title("optimisation loss", fontsize=9)
    axes[1].set_title("handle-target distance (image px)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("optimisation step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _finish(fig, path, spec)


def _plot_grid(rows, path, spec):
    from PIL import Image

    plt = _plt()
    max_rows = int(spec.get("max_rows", 4))
    first = Path(rows[0]["job_dir"])
    names = [s["name"] for s in rows[0]["_summary"].get("samples", [])][:max_rows]
    cols = [("source", first, "source_annotated.png")] + \
        [(r["setting"], Path(r["job_dir"]), "dragged_image.png") for r in rows]
    fig, axes = plt.subplots(max(1, len(names)), len(cols),
                             figsize=(1.9 * len(cols), 1.9 * max(1, len(names)) + 0.6),
                             squeeze=False)
    for i, name in enumerate(names or [""]):
        for j, (title, job, fname) in enumerate(cols):
            ax = axes[i][j]
            f = job / "results" / name / fname
            if name and f.is_file():
                ax.imshow(np.asarray(Image.open(f).convert("RGB")))
            else:
                ax.text(0.5, 0.5, "failed" if name else "no samples", ha="center", va="center",
                        fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(_wrap(title, 22), fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=6)
    _finish(fig, path, spec)


# -- per-category table of one evaluated run ------------------------------------------------

def _category_rows(root: Path, spec: dict) -> list[dict]:
    published = {str(p.get("setting")): p for p in (spec.get("published") or [])}
    rows = []
    for f in sorted(root.rglob("evaluation/categories.csv")):
        for r in csv.DictReader(f.open()):
            row = dict(setting=r["category"], value=r["category"], method=r.get("method"),
                       eval_md=_num(r.get("md")), eval_if=_num(r.get("if_")),
                       n_samples=r.get("n_samples"))
            pub = published.get(r["category"], {})
            for m in ("eval_md", "eval_if"):
                if m in pub:
                    row[f"published_{m}"] = pub[m]
            row["job_dir"] = str(f.parent.parent)
            rows.append(row)
    return rows


def _plot_categories(rows, path, spec):
    _plot_bars(rows, path, dict(spec, metrics=["eval_md", "eval_if"]))


class PaperFigure(Callback):
    """Hydra callback: the ``paper`` block's table and figure when a sweep or run ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        self._write(config, config.hydra.sweep.dir)

    def on_run_end(self, config, **kwargs) -> None:
        self._write(config, config.hydra.run.dir)

    @staticmethod
    def _write(config, root) -> None:
        spec = config.get("paper")
        if not spec:
            return
        from omegaconf import OmegaConf

        write_paper_figure(root, OmegaConf.to_container(spec, resolve=True))
