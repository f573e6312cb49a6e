#!/usr/bin/env python
"""Trains the toy model (``model=toy``) on the procedural world and saves it with its model card.

``python scripts/train_toy_model.py [vae.steps=N unet.steps=N seed=S out=DIR ...]``
(``configs/train_toy_model.yaml``). bf16 autocast on a GPU, fp32 on the CPU. The modules are
in :mod:`dragexp.models.toy_training`; this script runs them in order (VAE, latents, UNet +
text encoder) and writes the diffusers folder.
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="train_toy_model")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from dragexp.models.toy_training import train_toy_model

    train_toy_model(cfg, command=" ".join(["python scripts/train_toy_model.py", *sys.argv[1:]]),
                    work_dir=HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
