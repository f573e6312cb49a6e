"""The DDIM schedule every method shares, and its two elementary moves.

docs/methods.md, Shared 1: Stable Diffusion
1.5's DDIM (``scaled_linear`` betas 0.00085..0.012, 1000 training steps, ``steps_offset=1``,
``set_alpha_to_one=False``, "leading" spacing), 50 inference steps, so timesteps
981, 961, ..., 21, 1. Because ``set_alpha_to_one`` is off, the alpha-bar "before t = 0" is
``alphas_cumprod[0]`` (about 0.99915), not 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> torch.Tensor:
    """alpha-bar_t of SD's ``scaled_linear`` schedule: betas linear in sqrt space, float32.

    Computed exactly as diffusers' DDIM/DDPM schedulers do (float32 linspace of sqrt betas,
    squared, then a float32 cumulative product), so the values are bit-identical to theirs.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                           dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ldm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                       beta_end: float = 0.012) -> torch.Tensor:
    """The same schedule as the ldm / ControlNet code computes it (EasyDrag's reference).

    ldm's ``"linear"`` betas are the same square-root-linear ramp, but built in float64 with a
    float64 cumulative product, stored as float32 (docs/methods.md, EasyDrag 2).
    The two differ by up to about 1e-6 relative.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


@dataclass(frozen=True)
class DDIMSchedule:
    """A DDIM schedule with "leading" spacing and ``steps_offset`` (docs/methods.md, Shared 1).

    Attributes:
        alphas_cumprod: alpha-bar for every training timestep, float32 ``[1000]``.
        num_inference_steps: schedule length (50 for every method here).
        steps_offset: added to every timestep (1 for SD 1.5).
    """

    alphas_cumprod: torch.Tensor
    num_inference_steps: int = 50
    steps_offset: int = 1

    @classmethod
    def sd15(cls, num_inference_steps: int = 50) -> "DDIMSchedule":
        return cls(sd_alphas_cumprod(), num_inference_steps, 1)

    @classmethod
    def sd15_ldm(cls, num_inference_steps: int = 50) -> "DDIMSchedule":
        """SD 1.5's DDIM with alpha-bar computed as the ldm code does (:func:`ldm_alphas_cumprod`)."""
        return cls(ldm_alphas_cumprod(), num_inference_steps, 1)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def step_ratio(self) -> int:
        return self.num_train_timesteps // self.num_inference_steps

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        # set_alpha_to_one=False: the alpha "before t=0" is alpha-bar[0], not 1.
        return self.alphas_cumprod[0]

    @property
    def timesteps(self) -> list[int]:
        """Denoising order, largest first: 981, 961, ..., 1 for 50 steps."""
        return [i * self.step_ratio + self.steps_offset
                for i in reversed(range(self.num_inference_steps))]

    def alpha_bar(self, t: int) -> torch.Tensor:
        """alpha-bar at timestep ``t``; ``t < 0`` falls back to ``final_alpha_cumprod``."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def num_edit_steps(self, inversion_strength: float) -> int:
        """How many steps are inverted (and later denoised): ``round(strength * 50)``."""
        return int(round(inversion_strength * self.num_inference_steps))

    def edit_index(self, n_actual_steps: int) -> int:
        """Index into :attr:`timesteps` of the edit timestep (15 for 35 of 50 steps)."""
        if not 0 < n_actual_steps <= self.num_inference_steps:
            raise ValueError(
                f"n_actual_inference_step must be in 1..{self.num_inference_steps}, "
                f"got {n_actual_steps}")
        return self.num_inference_steps - n_actual_steps

    def edit_timestep(self, n_actual_steps: int) -> int:
        """The timestep at which the drag happens (681 for 35 of 50 steps)."""
        return self.timesteps[self.edit_index(n_actual_steps)]

    def inversion_timesteps(self, n_actual_steps: int) -> list[int]:
        """Destination timesteps of the inversion steps, smallest first: 1, 21, ..., 681."""
        return list(reversed(self.timesteps))[:n_actual_steps]


def _scalars_like(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.to(device=x.device, dtype=torch.float32)


def predict_x0(eps: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0-hat = (x - sqrt(1 - a) eps) / sqrt(a) (DDIM, Song et al. 2021, eq. 12 first term)."""
    a = _scalars_like(alpha_bar, x)
    return (x - (1 - a) ** 0.5 * eps) / a**0.5


def ddim_step(eps: torch.Tensor, t: int, x: torch.Tensor, schedule: DDIMSchedule, *,
              eps_x0: torch.Tensor | None = None, std: torch.Tensor | None = None
              ) -> torch.Tensor:
    """One DDIM step from ``t`` to ``t - step_ratio`` (DDIM, Song et al. 2021, eq. 12).

    Deterministic (``std`` None, eta = 0): x_prev = sqrt(a_prev) x0-hat + sqrt(1 - a_prev) eps,
    with ``a_prev`` falling back to ``final_alpha_cumprod`` below t = 0. This is both
    DragDiffusion's one-step denoise inside the drag loop and diffusers' ``DDIMScheduler.step``
    used for the final denoising (they differ only at ``prev == 0``, which the offset-1 schedule
    never hits).

    With ``std`` = eta * sigma_t (:func:`ddim_variance`): the direction term is
    sqrt(1 - a_prev - std^2) eps, the noise ``std * z`` being the caller's to add.
    ``eps_x0`` (DragonDiffusion's guided prediction) makes x0-hat while ``eps`` keeps the
    direction (docs/methods.md, DragonDiffusion).
    """
    prev_t = t - schedule.step_ratio
    a_t = schedule.alpha_bar(t)
    a_prev = _scalars_like(schedule.alpha_bar(prev_t), x)
    x0 = predict_x0(eps if eps_x0 is None else eps_x0, x, a_t)
    if std is None:
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps


def ddim_variance(schedule: DDIMSchedule, t: int) -> torch.Tensor:
    """DDIM's sigma_t^2 / eta^2 for the step from ``t``: (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)
    (eq. 16)."""
    a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t - schedule.step_ratio)
    return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)


def inversion_step(eps: torch.Tensor, t_next: int, x: torch.Tensor,
                   schedule: DDIMSchedule) -> torch.Tensor:
    """One DDIM inversion step towards ``t_next`` (docs/methods.md, DragDiffusion 2).

    ``eps`` is the UNet's prediction for the *current* latent evaluated at the *destination*
    timestep ``t_next``; the current latent is treated as being at ``t_next - step_ratio``, whose
    alpha-bar falls back to ``final_alpha_cumprod`` on the first step (t_next = 1).
    """
    a_cur = schedule.alpha_bar(t_next - schedule.step_ratio)
    a_next = _scalars_like(schedule.alpha_bar(t_next), x)
    x0 = predict_x0(eps, x, a_cur)
    return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps
