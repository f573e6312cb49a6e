"""One W&B run per experiment job (offline by default; ``wandb sync`` later).

Opening a run per image is what costs (docs/methods.md, Framework 2), so the experiment opens
one run and logs every sample into it: images, a per-step trajectory table and per-sample metrics.
"""

from __future__ import annotations

import os
from pathlib import Path

ID_FILE = "wandb_run_id.txt"


class ExperimentLog:
    """A thin wrapper over a W&B run; ``enabled=False`` makes every call a no-op."""

    def __init__(self, enabled: bool = True, project: str = "dragexp", mode: str = "offline",
                 name: str | None = None, group: str | None = None, dir: str | None = None,
                 config: dict | None = None, tags: list[str] | None = None):
        self.enabled = bool(enabled)
        self.run = None
        self.resumed = False
        self._rows: list[list] = []
        if not self.enabled:
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        if dir:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        # A run folder that is gone on with (resume) keeps one W&B run: the id is kept beside
        # the results and handed back, so `wandb sync` merges the parts into one run.
        id_file = Path(dir) / ID_FILE if dir else None
        run_id = id_file.read_text().strip() if id_file and id_file.is_file() else None
        self.run = wandb.init(project=project, mode=mode, name=name, group=group, dir=dir,
                              config=config, tags=list(tags or []), reinit="finish_previous",
                              id=run_id, resume="allow" if run_id else None)
        self.resumed = run_id is not None
        if id_file and not self.resumed:
            id_file.write_text(self.run.id + "\n")

    @property
    def run_dir(self) -> str | None:
        return getattr(self.run, "dir", None)

    def log_sample(self, index: int, name: str, images: dict[str, "object"], metrics: dict,
                   trajectory: list[list[list[float]]], losses: list[float]) -> None:
        if not self.enabled:
            return
        wb = self._wandb
        payload = {f"sample/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        payload.update({f"images/{k}": wb.Image(v, caption=name) for k, v in images.items()})
        payload["sample/index"] = index
        self.run.log(payload, step=index)
        for k, hs in enumerate(trajectory):
            loss = losses[k] if k < len(losses) else None
            for i, (x, y) in enumerate(hs):
                self._rows.append([name, k, i, x, y, loss])

    def log_error(self, index: int, name: str, error: str) -> None:
        if self.enabled:
            self.run.log({"sample/failed": 1, "sample/index": index}, step=index)

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        wb = self._wandb
        if self._rows:
            table = wb.Table(columns=["sample", "step", "handle", "x", "y", "loss"], data=self._rows)
            self.run.log({"trajectories": table})
        for k, v in summary.items():
            self.run.summary[k] = v
        self.run.finish()
