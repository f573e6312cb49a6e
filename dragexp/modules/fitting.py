"""One way to fit a per-image LightningModule: a fresh, quiet Trainer that leaves models in place.

A Trainer cannot be reused after it reached its stop condition, and a fresh one costs
milliseconds with checkpointing, model summary and loggers off (docs/methods.md, Framework 1).
Lightning's strategies move the module to the CPU at teardown; :class:`StayOnDevice` does not,
so a bundle on the GPU stays there for the next stage and the next sample (and the fitted tensor
stays beside it) instead of crossing the bus twice per fit.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

_QUIET = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
          "lightning.fabric.utilities.rank_zero")


def _device(module: nn.Module) -> torch.device | None:
    p = next(module.parameters(), None)
    return None if p is None else p.device


class StayOnDevice(SingleDeviceStrategy):
    """Lightning's single-device strategy without the move of the module to the CPU at teardown."""

    def teardown(self) -> None:
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def fit(module: L.LightningModule, *, max_steps: int, callbacks: Sequence[L.Callback] = (),
        progress: bool = True, keep: Sequence[nn.Module] = (), **trainer_kwargs) -> L.Trainer:
    """Fit ``module`` for at most ``max_steps`` steps; ``keep`` modules keep device and mode."""
    kwargs = dict(max_steps=max_steps, max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_model_summary=False, enable_progress_bar=progress,
                  num_sanity_val_steps=0, accelerator="auto", devices=1)
    kwargs.update(trainer_kwargs)
    home = _device(module)
    if home is not None and kwargs.get("strategy") is None and \
            kwargs["accelerator"] in ("auto", "gpu" if home.type == "cuda" else home.type):
        kwargs["accelerator"] = "gpu" if home.type == "cuda" else "cpu"
        kwargs["strategy"] = StayOnDevice(device=home)
    kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + list(callbacks)
    places = [(m, _device(m), m.training) for m in keep if isinstance(m, nn.Module)]
    levels = {name: logging.getLogger(name).level for name in _QUIET}
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*GPU available but not used.*")
            # The frozen models stay in eval mode (SD's UNet/VAE have no active dropout).
            warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            trainer = L.Trainer(**kwargs)
            trainer.fit(module)
    finally:
        for m, device, training in places:
            if device is not None:
                m.to(device)
            m.train(training)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return trainer
