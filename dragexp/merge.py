"""Merge the results of shards (``data.shard=i data.num_shards=n``) into one run folder.

Each shard edits every n-th sample; per-sample work is seeded per sample, so the merged folder
holds the same files, and its summary the same numbers, as one unsharded run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .experiment import summarise
from .reporting.results import write_json_atomic


def merge_shards(out: str | Path, shard_dirs: list[str | Path]) -> dict:
    """Copy every shard's ``results/<sample>`` into ``out/results`` and summarise them once."""
    out = Path(out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    rows, errors, seen = [], [], set()
    method = model = None
    load_s = 0.0
    for d in map(Path, shard_dirs):
        summary_file = d / "run_summary.json"
        if not summary_file.is_file():
            raise FileNotFoundError(f"{summary_file}: not a finished run (no run_summary.json)")
        s = json.loads(summary_file.read_text())
        method, model = s.get("method", method), s.get("model", model)
        load_s = max(load_s, s.get("seconds_model_load", 0.0))
        for row in s.get("samples", []):
            name = row["name"]
            if name in seen:
                raise ValueError(f"sample {name!r} appears in more than one shard ({d})")
            seen.add(name)
            dst = out / "results" / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(d / "results" / name, dst)
            rows.append(row)
        errors += json.loads((d / "errors.json").read_text()) if (d / "errors.json").is_file() else []
    rows.sort(key=lambda r: r["name"])
    summary = summarise(rows, errors, method, model, load_s)
    summary["merged_from"] = [str(d) for d in shard_dirs]
    write_json_atomic(out / "errors.json", errors)
    write_json_atomic(out / "run_summary.json", dict(summary, samples=rows))
    return summary
