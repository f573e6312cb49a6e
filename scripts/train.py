#!/usr/bin/env python
"""Entry point: ``python scripts/train.py [experiment=NAME] [overrides...]``.

Composes ``configs/train.yaml`` with Hydra and hands it to :func:`dragexp.experiment.run`.
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra_plugins.dragexp_launcher.gpu_launcher import register
from omegaconf import DictConfig

import dragexp  # noqa: F401,E402  (registers train.yaml's run-folder resolver)

register()  # hydra/launcher=gpus


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from hydra.types import RunMode

    from dragexp.experiment import RunError, RunFailed, run

    hydra_cfg = HydraConfig.get()
    try:
        run(cfg, hydra_cfg.runtime.output_dir)
    except RunFailed as failed:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # One setting of a sweep failing on every sample: the other settings still run,
            # and the sweep summary counts the failures.
            logging.getLogger("dragexp").error("job %s: %s", hydra_cfg.job.num, failed)
            return
        raise SystemExit(f"dragexp: {failed}") from None
    except RunError as wrong:
        # Exit non-zero, one line, no traceback (errors.json holds every sample's message).
        raise SystemExit(f"dragexp: {wrong}") from None


if __name__ == "__main__":
    main()
