"""Clicks, handles, targets and masks in each method's supervision space.

docs/methods.md, Shared 2: clicks are (x, y) = (column, row) image pixels, alternating
handle, target. DragDiffusion and DragNoise supervise on a grid of int(H/2) x int(W/2); a click
becomes (row, col) = round(y / H * sup_h, x / W * sup_w) with round-half-to-even
(``torch.round``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supervision_size(image_hw: tuple[int, int], scale: float = 0.5) -> tuple[int, int]:
    """The supervision grid: int(scale * H) x int(scale * W) (half the image for DragDiffusion)."""
    return int(scale * image_hw[0]), int(scale * image_hw[1])


def clicks_to_grid(points_xy, image_hw: tuple[int, int], grid_hw: tuple[int, int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clicks (x, y) in image pixels -> handles, targets as float32 (row, col) on the grid.

    Each coordinate is scaled in double precision, stored as float32, then rounded half to even
    with ``torch.round``, as the reference does.
    """
    H, W = image_hw
    gh, gw = grid_hw
    rc = torch.tensor([[y / H * gh, x / W * gw] for x, y in (tuple(map(float, p)) for p in points_xy)],
                      dtype=torch.float32)
    rc = torch.round(rc)
    return rc[0::2].clone(), rc[1::2].clone()


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    """Any positive value is editable: 0/1 and 0/255 masks mean the same (1 = may change)."""
    return (mask > 0).to(torch.float32)


def resize_mask_nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (1, 1, H, W) mask (PyTorch's ``nearest`` sampling)."""
    return F.interpolate(mask, size=size, mode="nearest")
