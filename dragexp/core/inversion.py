"""DDIM inversion (docs/methods.md, DragDiffusion 2)."""

from __future__ import annotations

from typing import Callable

import torch

from .schedule import DDIMSchedule, inversion_step

EpsFn = Callable[[torch.Tensor, int, int], torch.Tensor]


@torch.no_grad()
def ddim_invert(eps_fn: EpsFn, latent: torch.Tensor, schedule: DDIMSchedule,
                n_steps: int) -> list[torch.Tensor]:
    """Invert ``latent`` for ``n_steps`` DDIM steps; returns all ``n_steps + 1`` latents.

    Step k evaluates the UNet on the current latent at the *destination* timestep
    t = 1 + 20 (k - 1) and moves it there (:func:`dragexp.core.schedule.inversion_step`). Latent
    ``[0]`` is the input; ``[-1]`` is z_t at the edit timestep (681 for 35 of 50 steps).
    ``eps_fn(x, t, schedule_index)`` returns the noise prediction (guidance 1 for real images).
    """
    latents = [latent]
    x = latent
    timesteps = schedule.timesteps
    for t in schedule.inversion_timesteps(n_steps):
        x = inversion_step(eps_fn(x, t, timesteps.index(t)), t, x, schedule)
        latents.append(x)
    return latents
