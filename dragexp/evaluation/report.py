"""Evaluation reports: per-sample / per-category / overall tables, comparison table, plots, W&B.

Files written to the report folder:

- ``samples.csv``: one row per (results folder, sample): pairs, per-pair distances, LPIPS, IF,
  CLIP similarity, seconds; ``missing.csv``: samples without an edit and why;
- ``categories.csv``: per (results folder, category): MD pooled over the category's pairs,
  IF = 1 - mean LPIPS, CLIP, counts;
- ``comparison.csv`` / ``comparison.md``: one row per results folder (method x metric), the
  way the papers print it;
- ``evaluation.json``: all of the above plus the protocol of every number;
- ``md_if_scatter.png`` (every evaluated folder) and ``per_category.png`` (MD and IF bars per
  category, one bar per folder).

Every row names the protocol that produced it (``protocol`` column; docs/evaluation.md section
6) and whether its models make it comparable with published tables (``comparable_md``,
``comparable_if``, ``comparable_clip``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

__all__ = ["comparison_rows", "category_rows", "sample_rows", "write_report",
           "markdown_table"]


def _protocol_cols(fe) -> dict:
    p = fe.protocol
    c = p["comparable_to_published"]
    return dict(protocol=p["name"], noise=p["noise"], comparable_md=c["md"],
                comparable_if=c["if_"], comparable_clip=c["clip"])


def comparison_rows(evals) -> list[dict]:
    """One row per results folder: MD, IF, LPIPS, CLIP, counts, seconds, protocol."""
    rows = []
    for fe in evals:
        o = fe.overall()
        rows.append(dict(method=fe.label, md=o["md"], if_=o["if_"], lpips=o["lpips"],
                         clip_sim=o["clip_sim"], n_samples=o["n_samples"], n_pairs=o["n_pairs"],
                         n_missing=o["n_missing"], seconds_per_sample=o["seconds_per_sample"],
                         **_protocol_cols(fe), folder=str(fe.folder.root or "source images")))
    return rows


def category_rows(evals) -> list[dict]:
    rows = []
    for fe in evals:
        for cat, a in fe.per_category().items():
            rows.append(dict(method=fe.label, category=cat, md=a["md"], if_=a["if_"],
                             lpips=a["lpips"], clip_sim=a["clip_sim"], n_samples=a["n_samples"],
                             n_pairs=a["n_pairs"], **_protocol_cols(fe)))
    return rows


def sample_rows(evals) -> list[dict]:
    rows = []
    for fe in evals:
        pc = _protocol_cols(fe)
        for s in fe.scores:
            r = s.row()
            rows.append(dict(method=fe.label, name=r["name"], category=r["category"],
                             n_pairs=r["n_pairs"], md_sample_mean=r["md_sample_mean"],
                             dist=" ".join(f"{d:.4f}" for d in r.get("dist", [])),
                             match_xy=" ".join(f"{x},{y}" for x, y in r.get("match_xy", [])),
                             lpips=r["lpips"], if_=r["if_"], clip_sim=r["clip_sim"],
                             seconds=r["seconds"], protocol=pc["protocol"]))
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols or ["empty"])
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _fmt(v, nd=3) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{nd}f}"
    return str(v)


def markdown_table(evals) -> str:
    """The comparison as a Markdown table (MD px lower is better, IF / CLIP higher)."""
    rows = comparison_rows(evals)
    lines = ["| method | MD (px) ↓ | IF ↑ | CLIP sim ↑ | samples | pairs | missing | s/sample |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt(r['md'], 2)} | {_fmt(r['if_'])} | "
                     f"{_fmt(r['clip_sim'])} | {r['n_samples']} | {r['n_pairs']} | "
                     f"{r['n_missing']} | {_fmt(r['seconds_per_sample'], 2)} |")
    protos = {json.dumps(fe.protocol, sort_keys=True): fe.protocol for fe in evals}
    lines.append("")
    for p in protos.values():
        c = p["comparable_to_published"]
        lines.append(f"Protocol: {p['name']} (DIFT: {p['dift']}; LPIPS: {p['lpips']}; CLIP: "
                     f"{p['clip']}; noise: {p['noise']}). Comparable with published tables: "
                     f"MD {'yes' if c['md'] else 'no'}, IF {'yes' if c['if_'] else 'no'}, "
                     f"CLIP {'yes' if c['clip'] else 'no'}.")
    return "\n".join(lines) + "\n"


def _plots(evals, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = comparison_rows(evals)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for r in rows:
        ax.scatter(r["md"], r["if_"], s=40)
        ax.annotate(r["method"], (r["md"], r["if_"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel("Mean Distance (px), lower is better")
    ax.set_ylabel("Image Fidelity = 1 - LPIPS, higher is better")
    ax.set_title(f"DragBench MD vs IF ({evals[0].protocol['name']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    fig.tight_layout()
    p = out / "md_if_scatter.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)

    cats = sorted({c for fe in evals for c in fe.per_category()})
    if cats:
        fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.9 * len(cats) * max(1, len(evals)) * 0.6 + 4), 7))
        width = 0.8 / max(1, len(evals))
        for k, fe in enumerate(evals):
            pc = fe.per_category()
            xs = [i + (k - (len(evals) - 1) / 2) * width for i in range(len(cats))]
            axes[0].bar(xs, [pc.get(c, {}).get("md", float("nan")) for c in cats], width,
                        label=fe.label)
            axes[1].bar(xs, [pc.get(c, {}).get("if_", float("nan")) for c in cats], width,
                        label=fe.label)
        axes[0].set_ylabel("MD (px) ↓")
        axes[1].set_ylabel("IF ↑")
        for ax in axes:
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=25, ha="right", fontsize=7)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=7)
        axes[0].set_title(f"per category ({evals[0].protocol['name']})", fontsize=9)
        fig.tight_layout()
        p = out / "per_category.png"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


def write_report(evals, out_dir: str | Path, wandb_run=None, plots: bool = True) -> dict:
    """Write every table (CSV + JSON), the Markdown comparison, the plots; log to W&B.

    Returns:
        The JSON document written to ``evaluation.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comp, cats, samp = comparison_rows(evals), category_rows(evals), sample_rows(evals)
    missing = [dict(method=fe.label, **m) for fe in evals for m in fe.missing]
    _write_csv(out / "comparison.csv", comp)
    _write_csv(out / "categories.csv", cats)
    _write_csv(out / "samples.csv", samp)
    _write_csv(out / "missing.csv", missing)
    md = markdown_table(evals)
    (out / "comparison.md").write_text(md)
    doc = dict(protocols={fe.label: fe.protocol for fe in evals}, comparison=comp,
               categories=cats, samples=[dict(method=fe.label, **s.row()) for fe in evals
                                         for s in fe.scores], missing=missing)
    (out / "evaluation.json").write_text(json.dumps(doc, indent=1, default=float))
    pngs = _plots(evals, out) if plots and evals else []
    if wandb_run is not None:
        import wandb

        def table(rows):
            cols = list(rows[0]) if rows else ["empty"]
            return wandb.Table(columns=cols, data=[[_plain(r.get(c)) for c in cols] for r in rows])

        payload = {"eval/comparison": table(comp), "eval/categories": table(cats),
                   "eval/samples": table(samp)}
        payload.update({f"eval/{p.stem}": wandb.Image(str(p)) for p in pngs})
        wandb_run.log(payload)
        if len(evals) == 1:
            o = comp[0]
            for k in ("md", "if_", "lpips", "clip_sim", "n_samples", "n_missing"):
                wandb_run.summary[f"eval/{k}"] = o[k]
            wandb_run.summary["eval/protocol"] = o["protocol"]
    return doc


def _plain(v):
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
