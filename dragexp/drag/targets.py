"""What a drag optimisation optimises: strategies for :class:`DragOptimisation`.

* :class:`LatentTarget` - DragDiffusion: the noisy latent z_t itself (docs/methods.md,
  DragDiffusion 3).
* :class:`dragexp.methods.easydrag.reference.ReferenceLatentTarget` - EasyDrag: z_t too, but
  every step runs the batch ``[z_t, frozen inverted z_t]`` with reference attention in the
  decoder self-attention.
* :class:`dragexp.methods.latent_drag.bottleneck.BottleneckTarget` - DragNoise: a UNet feature
  map (the mid-block output).

Each strategy is handed the frozen :class:`DragProblem` (never the module that optimises it) and
gives the initial value of the optimised tensor, the UNet forward that turns its current value
into (eps, native-resolution features), and the latent on which the one-step denoise x_{t-1} is
taken. A target may also give ``initial_forward`` for F0 when that forward
differs from the per-step one, and ``step_forward`` for a captured step (``speed=graphs``):
the per-step forward with its hooks and controllers set up once. ``optimises_latent`` says whether the optimised tensor is z_t
(what a gradient w.r.t. z_t, e.g. for the auto mask, needs).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from ..core.features import FeatureTap, tapped_forward, unet_eps_and_features


@dataclass(frozen=True)
class DragProblem:
    """What one drag optimisation is about, fixed before it starts.

    Attributes:
        unet: the frozen UNet (LoRA may be active).
        z_t: the inverted latent at the edit timestep, (1, 4, h, w), float32.
        timestep: the edit timestep t.
        text_embedding: the prompt embedding (1, L, D).
        feature_idx: UNet feature indices that supervise (0 = mid block, k = ``up_blocks[k-1]``).
    """

    unet: nn.Module
    z_t: torch.Tensor
    timestep: int
    text_embedding: torch.Tensor
    feature_idx: tuple[int, ...]


class LatentTarget:
    """Optimise z_t; every step runs the whole UNet on it."""

    name = "latent"
    optimises_latent = True

    def initial(self, problem: DragProblem) -> torch.Tensor:
        return problem.z_t.clone()

    def forward(self, problem: DragProblem, param: torch.Tensor):
        return unet_eps_and_features(problem.unet, param, problem.timestep,
                                     problem.text_embedding, list(problem.feature_idx))

    def step_forward(self, problem: DragProblem, stack: ExitStack):
        """:meth:`forward` with its set-up done once per optimisation: the feature tap is
        entered on ``stack`` (closed when the optimisation ends) and the returned function of
        the optimised tensor runs the UNet only, the graph a captured step compiles
        (:mod:`dragexp.performance.capture`)."""
        tap = stack.enter_context(FeatureTap(problem.unet, problem.feature_idx))
        return lambda param: tapped_forward(problem.unet, tap, param, problem.timestep,
                                            problem.text_embedding)

    def latent(self, problem: DragProblem, param: torch.Tensor) -> torch.Tensor:
        return param

    def outcome(self, problem: DragProblem, result: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(edited latent for denoising, bottleneck to propagate): the optimised z_t, none."""
        return result, None
