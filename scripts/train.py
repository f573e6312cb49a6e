#!/usr/bin/env python
"""Entry point: ``python scripts/train.py [experiment=NAME] [overrides...]``.

Composes ``configs/train.yaml`` with Hydra and hands it to :func:`dragexp.experiment.run`.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra_plugins.dragexp_launcher.gpu_launcher import register
from omegaconf import DictConfig

register()  # hydra/launcher=gpus


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from dragexp.experiment import run

    run(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
