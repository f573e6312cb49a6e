"""Which folder a run writes to: the same command goes on in its own unfinished run.

``hydra.run.dir`` is ``${dragexp_run_dir:outputs/<experiment>, <new dated folder>, <task
overrides>, <resume>}`` (``configs/train.yaml``). With ``resume=true`` (the default) the newest
folder under ``outputs/<experiment>/`` that ran with the same overrides (Hydra's
``.hydra/overrides.yaml``, compared without the keys that change no result) and did not finish
(no ``run_summary.json``, or samples failed or missing) is used again, so a run stopped half-way
is finished by running the same command again; otherwise a new dated folder. ``resume=false``
always starts a new folder, ``resume=<folder>`` names one.

Registered on import (``dragexp/__init__.py``), so every entry point that composes
``train.yaml`` can resolve it.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

# Overrides that change how a run is shown or logged, never what it computes.
IGNORED_KEYS = ("resume", "progress", "logger", "hydra")


def result_key(overrides) -> tuple[str, ...]:
    """The overrides that decide a run's results, sorted (``key=value`` strings)."""
    kept = []
    for o in overrides or ():
        key = str(o).split("=", 1)[0].lstrip("+~")
        if key.split(".", 1)[0].split("/", 1)[0] not in IGNORED_KEYS:
            kept.append(str(o))
    return tuple(sorted(kept))


def is_unfinished(run: Path) -> bool:
    """True for a run folder without ``run_summary.json``, or whose summary counts failed or
    missing samples."""
    summary = run / "run_summary.json"
    if not summary.is_file():
        return True
    try:
        s = json.loads(summary.read_text())
    except (OSError, ValueError):
        return True
    return bool(s.get("num_failed")) or bool(s.get("num_missing"))


def _overrides_of(run: Path) -> tuple[str, ...] | None:
    file = run / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return None
    try:
        return result_key(OmegaConf.to_container(OmegaConf.load(file)))
    except Exception:  # a damaged file: not a run to go on with
        return None


def latest_unfinished(root: str | Path, overrides) -> Path | None:
    """The newest run folder directly under ``root`` with the same result-deciding overrides
    that did not finish, or None. Folders are dated ``YYYY-MM-DD_HH-MM-SS``, so names sort by
    time."""
    root = Path(root)
    if not root.is_dir():
        return None
    want = result_key(overrides)
    for run in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name,
                      reverse=True):
        if _overrides_of(run) == want and is_unfinished(run):
            return run
    return None


_CHOSEN: dict[tuple, str] = {}


def run_dir(root: str, new: str, overrides, resume) -> str:
    """The folder of this run (see the module docstring). The answer is kept for the process,
    so every later resolution of ``hydra.run.dir`` names the same folder."""
    key = (str(root), str(new), result_key(overrides), str(resume))
    if key not in _CHOSEN:
        if isinstance(resume, str) and resume.lower() not in ("true", "false"):
            chosen = resume  # resume=<folder>
        elif str(resume).lower() == "true":
            found = latest_unfinished(root, overrides)
            chosen = str(found) if found is not None else new
        else:
            chosen = new
        _CHOSEN[key] = chosen
    return _CHOSEN[key]


OmegaConf.register_new_resolver("dragexp_run_dir", run_dir, replace=True)
