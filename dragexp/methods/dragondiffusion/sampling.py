"""DragonDiffusion's inversion with a memory bank and its guided DDIM sampler.

docs/methods.md, DragonDiffusion 1-7 (``DDIMInversion``, ``Sampler.edit``):

- inversion: all 50 steps with the prompt (CFG 1, no image tokens), every latent kept, the
  memory bank recorded at the index of the sampling step with the same timestep;
- sampling, steps i = 0..49 at t = 981..1: CFG on ``[uncond (+ zero-image tokens), cond
  (+ image tokens)]``; at guided steps the energy gradient is added to the noise prediction used
  for x0 only, the direction term keeps the unguided eps (DragonDiffusion 5);
- ``alg='D'`` (DragonDiffusion, the default here): guidance at every i < 30, no noise, no time
  travel; ``alg='D+'`` (DiffEditor, the authors' released default): guidance at i < 10 and even
  i < 30, regional SDE for 10 < i < 20 (one draw shared by the edit region, eta = 0.4, and the
  rest, eta = ``sde_strength_un``), time travel x3 at i = 22, 24, 26, 28 (each repeat re-inverts
  its result back to t with the plain UNet and the image-prompt context; the last one is kept).

The loop reuses the shared parts: :func:`~dragexp.core.inversion.ddim_invert`,
:class:`~dragexp.core.sampling.NoisePredictor` (CFG), :func:`~dragexp.core.schedule.ddim_step` (with
the guided x0 and the eta noise), :func:`~dragexp.core.schedule.ddim_variance` and
:func:`~dragexp.core.schedule.inversion_step`. Every step count is a :class:`DragonSchedule` value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ...core.inversion import ddim_invert
from ...core.sampling import NoisePredictor
from ...core.schedule import DDIMSchedule, ddim_step, ddim_variance, inversion_step
from .energy import GuidanceResult

__all__ = ["DragonSchedule", "DragonTrace", "invert_with_bank", "dragon_edit"]


@dataclass
class DragonSchedule:
    """When each ingredient of the sampler acts (loop index i = 0 .. n-1, t decreasing).

    Args:
        alg: ``"D"`` (DragonDiffusion) or ``"D+"`` (DiffEditor).
        guidance_steps: guidance at i < guidance_steps (30).
        dense_guidance_steps: ``D+`` only: every step below this is guided (10), later only
            even steps.
        time_travel_steps: ``D+`` only: steps repeated (22, 24, 26, 28).
        time_travel_repeats: repeats of those steps (3).
        sde_steps: ``D+`` only: inclusive range of steps with regional SDE noise (11..19).
        ip_steps: inclusive range of steps in which the image prompt acts (10..19).
        bank_start_step: drag / move read the memory bank from this step on (5).
        blend_bank_steps: inclusive range in which appearance / paste read the bank (0..35).
    """

    alg: str = "D"
    guidance_steps: int = 30
    dense_guidance_steps: int = 10
    time_travel_steps: tuple[int, ...] = (22, 24, 26, 28)
    time_travel_repeats: int = 3
    sde_steps: tuple[int, int] = (11, 19)
    ip_steps: tuple[int, int] = (10, 19)
    bank_start_step: int = 5
    blend_bank_steps: tuple[int, int] = (0, 35)

    def __post_init__(self):
        if self.alg not in ("D", "D+"):
            raise ValueError(f"alg must be 'D' (DragonDiffusion) or 'D+' (DiffEditor), got {self.alg!r}")
        self.time_travel_steps = tuple(int(s) for s in self.time_travel_steps)
        self.sde_steps = tuple(int(s) for s in self.sde_steps)
        self.ip_steps = tuple(int(s) for s in self.ip_steps)
        self.blend_bank_steps = tuple(int(s) for s in self.blend_bank_steps)

    def guided(self, i: int) -> bool:
        if i >= self.guidance_steps:
            return False
        return self.alg == "D" or i < self.dense_guidance_steps or i % 2 == 0

    def repeats(self, i: int) -> int:
        return self.time_travel_repeats if self.alg == "D+" and i in self.time_travel_steps else 1

    def in_sde(self, i: int) -> bool:
        return self.sde_steps[0] <= i <= self.sde_steps[1]

    def bank_steps(self, mode: str) -> tuple[int | None, int | None]:
        if mode in ("appearance", "paste"):
            return self.blend_bank_steps
        return (self.bank_start_step, None)


@dataclass
class DragonTrace:
    """What a sampling run did, for conformance traces and diagnostics (all optional)."""

    call_iter: list[int] = field(default_factory=list)
    call_t: list[int] = field(default_factory=list)
    call_latent: list[torch.Tensor] = field(default_factory=list)
    raw_eps: dict[int, torch.Tensor] = field(default_factory=dict)
    guidance: list[GuidanceResult] = field(default_factory=list)
    guidance_t: list[int] = field(default_factory=list)
    timetravel_t: list[int] = field(default_factory=list)
    timetravel_latent: list[torch.Tensor] = field(default_factory=list)
    sde_noise: list[torch.Tensor] = field(default_factory=list)
    keep_raw_at: tuple[int, ...] = ()


@torch.no_grad()
def invert_with_bank(unet, latent0: torch.Tensor, text: torch.Tensor, schedule: DDIMSchedule,
                     controller=None) -> list[torch.Tensor]:
    """``DDIMInversion.invert``: every step of the schedule with the prompt (CFG 1), all
    ``n + 1`` latents returned ([0] = x0, [-1] = z_T); the controller records the memory bank
    under each step's sampling index (the shared inversion passes it)."""
    predictor = NoisePredictor(unet, text)

    def eps(x, t, i):
        if controller is not None:
            controller.set("record", i)
        return predictor(x, t, i)

    try:
        return ddim_invert(eps, latent0, schedule, schedule.num_inference_steps)
    finally:
        if controller is not None:
            controller.set("plain")


@torch.no_grad()
def dragon_edit(unet, latent: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                schedule: DDIMSchedule, plan: DragonSchedule,
                guidance_fn: Callable[[int, int, torch.Tensor], GuidanceResult] | None,
                controller=None, guidance_scale: float = 4.0, energy_scale: float = 2000.0,
                sde_strength: float = 0.4, sde_strength_un: float = 0.0,
                sde_mask: torch.Tensor | None = None, emb_im: torch.Tensor | None = None,
                emb_im_uncond: torch.Tensor | None = None,
                noise: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
                trace: DragonTrace | None = None) -> torch.Tensor:
    """``Sampler.edit``: denoise ``latent`` (z_T after the task's pre-processing) to x0.

    Args:
        unet: generator (diffusers call signature); its processors are the caller's business
            (:func:`~dragexp.methods.dragondiffusion.image_prompt.dragon_attention`), ``controller`` is told the step.
        cond, uncond: prompt and empty-prompt embeddings (1, 77, D).
        plan: which steps are guided, noised, repeated.
        guidance_fn: ``(i, t, x) -> GuidanceResult`` (see :mod:`dragexp.methods.dragondiffusion.energy`).
        energy_scale: absolute energy scale; 0 disables guidance and time travel (as the
            reference does).
        sde_mask: (1, 1, h, w) float region that gets ``sde_strength`` noise (D+ only).
        emb_im, emb_im_uncond: image-prompt tokens appended to cond / uncond (None: text only).
        noise: draws the SDE noise (``torch.randn_like`` from the seeded global generator).
        trace: optional :class:`DragonTrace` filled in as the loop runs.
    """
    if emb_im is not None:
        cond_ctx = torch.cat([cond, emb_im], dim=1)
        uncond_ctx = torch.cat([uncond, emb_im_uncond], dim=1)
    else:
        cond_ctx, uncond_ctx = cond, uncond
    cfg = NoisePredictor(unet, cond_ctx, uncond_ctx.expand(*cond_ctx.shape), guidance_scale)
    plain = NoisePredictor(unet, cond_ctx)
    ratio = schedule.step_ratio
    x = latent
    for i, t in enumerate(schedule.timesteps):
        next_t = max(min(t - ratio, schedule.num_train_timesteps - 1), 0)
        repeat = 1 if energy_scale == 0 else plan.repeats(i)
        x_prev = x
        for r in range(repeat):
            if controller is not None:
                controller.set("sample", i)
            if trace is not None:
                trace.call_iter.append(i)
                trace.call_t.append(int(t))
                trace.call_latent.append(x[0].clone())
            eps = cfg(x, t, i)
            if trace is not None and i in trace.keep_raw_at and i not in trace.raw_eps:
                trace.raw_eps[i] = cfg.last_raw_eps.clone()
            eps_x0 = eps
            if energy_scale != 0 and plan.guided(i) and guidance_fn is not None:
                if controller is not None:
                    controller.set("plain", i)
                g = guidance_fn(i, t, x)
                if trace is not None:
                    trace.guidance.append(g)
                    trace.guidance_t.append(int(t))
                eps_x0 = eps + g.guidance
            eta, eta_rd = (sde_strength_un, sde_strength) if plan.in_sde(i) else (0.0, 0.0)
            sigma = ddim_variance(schedule, t) ** 0.5
            std, std_rd = eta * sigma, eta_rd * sigma
            x_prev = ddim_step(eps, t, x, schedule, eps_x0=eps_x0, std=std)
            x_prev_rd = ddim_step(eps, t, x, schedule, eps_x0=eps_x0, std=std_rd)
            if (eta_rd > 0 or eta > 0) and plan.alg == "D+":
                z = noise(x_prev)
                if trace is not None:
                    trace.sde_noise.append(z[0].clone())
                m = sde_mask if sde_mask is not None else torch.zeros_like(x_prev[:, :1])
                x_prev = (x_prev + std * z) * (1 - m) + (x_prev_rd + std_rd * z) * m
            if repeat > 1:
                # time travel: back to t with the plain generator and the image-prompt context
                if controller is not None:
                    controller.set("plain", i)
                if trace is not None:
                    trace.timetravel_t.append(int(next_t))
                    trace.timetravel_latent.append(x_prev[0].clone())
                x = inversion_step(plain(x_prev, next_t, i), t, x_prev, schedule)
        x = x_prev
    if controller is not None:
        controller.set("plain")
    return x
