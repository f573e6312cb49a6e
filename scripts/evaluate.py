#!/usr/bin/env python
"""DragBench evaluation: ``python scripts/evaluate.py results=<out> data.root=PATH [overrides]``.

Composes ``configs/evaluate.yaml`` with Hydra and hands it to
:func:`dragexp.evaluation.runner.evaluate_from_config`: MD (DIFT), IF (1 - LPIPS) and CLIP
similarity per sample, per category and overall, for one or several results folders, written
to the run folder (CSV, JSON, Markdown comparison, plots) and to W&B.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from dragexp.evaluation.report import markdown_table
    from dragexp.evaluation.runner import evaluate_from_config

    out = HydraConfig.get().runtime.output_dir
    evals = evaluate_from_config(cfg, out)
    print(markdown_table(evals))
    print(f"report: {out}")


if __name__ == "__main__":
    main()
