#!/usr/bin/env python
"""``python scripts/reconstruction.py [model=toy] [data=toybench] [data.count=20] [...]``:
DDIM inversion at DragDiffusion's settings then denoising, no edit, for each sample; prints the
PSNR against the source per sample and the mean (dragexp.evaluation.reconstruction)."""

import hydra
from omegaconf import DictConfig, OmegaConf

import dragexp  # noqa: F401,E402  (registers train.yaml's run-folder resolver)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    import numpy as np
    from hydra.utils import instantiate

    from dragexp.evaluation.reconstruction import reconstruction_psnr

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("shard", None), data_cfg.pop("num_shards", None)
    samples = list(instantiate(data_cfg))
    models = instantiate(cfg.model).to("cpu", None)
    m = cfg.method
    psnrs = reconstruction_psnr(models, samples, n_inference_step=int(m.n_inference_step),
                                inversion_strength=float(m.get("inversion_strength", 0.7)))
    for s, p in zip(samples, psnrs):
        print(f"{s.name}: {p:.2f} dB")
    print(f"mean over {len(psnrs)} samples ({models.source}, {m.n_inference_step} steps, strength "
          f"{m.get('inversion_strength', 0.7)}): {np.mean(psnrs):.2f} dB")


if __name__ == "__main__":
    main()
