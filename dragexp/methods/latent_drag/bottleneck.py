"""DragNoise's optimisation target: a UNet feature map (the bottleneck) for the fixed z_t."""

from __future__ import annotations

import torch

from ...core.features import FeatureTap
from ...drag.targets import DragProblem
from .unet_split import UNetDecoder


class BottleneckTarget:
    """Optimise a UNet feature map for the fixed z_t: the mid-block output by default (DragNoise).

    The encoder pass runs once (:class:`dragexp.unet_split.UNetDecoder`); every optimisation
    step runs only the decoder from the optimised feature on. ``feature`` follows dragexp's
    index convention (0 = mid block, the bottleneck; k = output of ``up_blocks[k-1]``, an
    ablation). The latent is returned unchanged and the optimised map is propagated in denoising.
    """

    optimises_latent = False

    def __init__(self, feature: int = 0):
        self.feature = int(feature)
        self.name = "bottleneck" if self.feature == 0 else f"feature{self.feature}"
        self.decoder = None

    def initial(self, problem: DragProblem) -> torch.Tensor:
        early = [i for i in problem.feature_idx if i < self.feature]
        if early:
            raise ValueError(f"supervising features {early} come before the optimised feature "
                             f"{self.feature} and could not change; use method.feature_idx >= "
                             f"{self.feature}")
        self.decoder = UNetDecoder(problem.unet, problem.z_t, problem.timestep, problem.text_embedding,
                                   start=self.feature)
        return self.decoder.bottleneck.detach().clone()

    def forward(self, problem: DragProblem, param: torch.Tensor):
        later = [i for i in problem.feature_idx if i != self.feature]
        with FeatureTap(problem.unet, later) as tap:
            eps = self.decoder(param)
        got = dict(zip(later, tap.features)) if later else {}
        return eps, [param if i == self.feature else got[i] for i in problem.feature_idx]

    def step_forward(self, problem: DragProblem, stack):
        """:meth:`forward` with the tap of the later features entered once on ``stack``
        (:meth:`dragexp.drag.targets.LatentTarget.step_forward`)."""
        later = [i for i in problem.feature_idx if i != self.feature]
        tap = stack.enter_context(FeatureTap(problem.unet, later)) if later else None

        def forward(param):
            eps = self.decoder(param)
            got = dict(zip(later, tap.take())) if later else {}
            return eps, [param if i == self.feature else got[i] for i in problem.feature_idx]
        return forward

    def latent(self, problem: DragProblem, param: torch.Tensor) -> torch.Tensor:
        return problem.z_t

    def outcome(self, problem: DragProblem, result: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return problem.z_t.clone(), result
