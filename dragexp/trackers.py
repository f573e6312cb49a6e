"""Point tracking strategies: where did each handle move after an optimisation step?

DragDiffusion's tracking (METHODS.md DragDiffusion step 3; NOTES section 2, step 2): for each
handle, search the (2 r_p + 1)^2 window around its current position for the feature nearest in
channel-summed L1 distance to F0 at the *initial* handle; row-major argmin, first minimum wins.
"""

from __future__ import annotations

import torch


class BorderError(ValueError):
    """A window or patch reaches past the top/left border where the reference crashes."""


class NearestFeatureTracker:
    """L1 nearest-neighbour tracking in a window around each handle.

    Args:
        radius: search radius r_p (window 2 r_p + 1).
        border: ``"clip"`` clips the window at the feature-map borders (DragDiffusion).
            ``"reference"`` reproduces DragNoise, whose unprotected slicing equals clipping at
            the bottom/right border but crashes when a window starts above/left of the map:
            there it raises :class:`BorderError` naming the handle instead.
    """

    def __init__(self, radius: int = 3, border: str = "clip"):
        if border not in ("clip", "reference"):
            raise ValueError(f"tracker border must be 'clip' or 'reference', got {border!r}")
        self.radius = int(radius)
        self.border = border

    def __call__(self, F0: torch.Tensor, F1: torch.Tensor, handles_init: torch.Tensor,
                 handles: torch.Tensor) -> torch.Tensor:
        """Return the new handle positions (float32 (N, 2) row, col); inputs are not modified."""
        H, W = F1.shape[-2:]
        r = self.radius
        new = handles.clone()
        for i in range(handles.shape[0]):
            r0, c0 = int(handles_init[i, 0]), int(handles_init[i, 1])
            f0 = F0[:, :, r0, c0][..., None, None]
            pr, pc = int(handles[i, 0]), int(handles[i, 1])
            if self.border == "reference" and (pr - r < 0 or pc - r < 0):
                raise BorderError(
                    f"handle {i} at (row {pr}, col {pc}) is within the tracking radius {r} of the "
                    f"top/left border of the {H}x{W} feature map, where the reference "
                    "implementation crashes; set the tracker border to 'clip' to continue")
            r1, r2 = max(0, pr - r), min(H, pr + r + 1)
            c1, c2 = max(0, pc - r), min(W, pc + r + 1)
            dist = (f0 - F1[:, :, r1:r2, c1:c2]).abs().sum(dim=1)[0]
            row, col = divmod(int(dist.argmin()), dist.shape[-1])
            new[i, 0] = r1 + row
            new[i, 1] = c1 + col
        return new
