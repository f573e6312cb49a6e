"""The tracker of ``method=freedrag_like``, the worked example of docs/ADDING_A_METHOD.md."""

from __future__ import annotations

import torch

from ...drag.trackers import Tracker


class LineSearchTracker(Tracker):
    """FreeDrag-like tracking without a search (the idea of Ling et al., CVPR 2024, "FreeDrag:
    feature dragging for reliable point-based image editing"; a walkthrough example of
    ``docs/ADDING_A_METHOD.md``, not a reproduction of their code).

    Each handle walks the straight line to its target in steps of ``step`` grid cells (rounded
    to the grid) and takes the next step only once the feature at its current position has
    come close to its *template*: relative L1 distance ``|F1[p] - T| / |T| <= accept``. The
    template starts as F0 at the initial handle and follows the features the handle accepted,
    ``T <- lam T + (1 - lam) F1[p]`` (FreeDrag's adaptive template), so the content carried
    along may change slowly rather than having to match the first step's.

    Stateful per sample (the templates): the callback configs build a fresh tracker for every
    drag problem.
    """

    def __init__(self, step: float = 2.0, accept: float = 0.7, lam: float = 0.7):
        if step <= 0 or not 0 <= lam <= 1 or accept <= 0:
            raise ValueError(f"LineSearchTracker needs step > 0, accept > 0 and 0 <= lam <= 1; "
                             f"got step={step}, accept={accept}, lam={lam}")
        self.step, self.accept, self.lam = float(step), float(accept), float(lam)
        self.templates: torch.Tensor | None = None

    def __call__(self, F0: torch.Tensor, F1: torch.Tensor, handles_init: torch.Tensor,
                 handles: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            raise ValueError("LineSearchTracker needs the targets")
        if self.templates is None:
            self.templates = torch.stack([F0[0, :, int(r), int(c)] for r, c in handles_init])
        new = handles.clone()
        for i in range(handles.shape[0]):
            p, t, tmpl = handles[i], targets[i], self.templates[i]
            f = F1[0, :, int(p[0]), int(p[1])]
            if float((f - tmpl).abs().sum() / tmpl.abs().sum().clamp_min(1e-8)) > self.accept:
                continue
            self.templates[i] = self.lam * tmpl + (1 - self.lam) * f
            d = t - p
            n = d.norm()
            new[i] = t.clone() if n <= self.step else torch.round(p + d / n * self.step)
        return new
