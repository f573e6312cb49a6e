"""Losses of the latent-optimising methods.

DragDiffusion / DragNoise motion supervision and mask term (METHODS.md DragDiffusion step 3;
NOTES_dragdiffusion_dragnoise.md section 2 steps 4-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_patch(feat: torch.Tensor, y1: torch.Tensor, x1: torch.Tensor, h: int, w: int
                 ) -> torch.Tensor:
    """Bilinear sample of an ``h x w`` patch whose top-left corner is at the real (y1, x1).

    The four integer corners are floor and floor + 1 of each coordinate, weights the distances
    to them. Indices past the map are clamped, which equals the reference's truncated slices
    wherever the reference runs at all (a one-row corner broadcasting at the last row).
    """
    H, W = feat.shape[-2:]
    y0, x0 = torch.floor(y1), torch.floor(x1)
    wy, wx = y1 - y0, x1 - x0
    rows = (y0.long() + torch.arange(h + 1, device=feat.device)).clamp(0, H - 1)
    cols = (x0.long() + torch.arange(w + 1, device=feat.device)).clamp(0, W - 1)
    p = feat[:, :, rows][:, :, :, cols]
    top, bot = p[:, :, :h], p[:, :, 1:h + 1]
    a, b = top[..., :w], bot[..., :w]
    c, d = top[..., 1:w + 1], bot[..., 1:w + 1]
    return (a * (1 - wx) * (1 - wy) + b * (1 - wx) * wy + c * wx * (1 - wy) + d * wx * wy)


def motion_supervision_loss(F1: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor,
                            radius: int = 1, reached: float = 2.0) -> torch.Tensor:
    """sum over handles farther than ``reached`` of (2 r + 1)^2 * mean |sg(F1[p]) - F1[p + d]|.

    DragDiffusion eq. 3 as the authors' code computes it: the patch around the current handle,
    clipped to the map, of the current features *detached*, against the same patch shifted by
    the unit vector d towards the target, bilinearly sampled from F1 with gradient. The factor
    (2 r + 1)^2 stays even for a border-clipped patch.
    """
    H, W = F1.shape[-2:]
    loss = F1.new_zeros(())
    for p, t in zip(handles, targets):
        if (t - p).norm() < reached:
            continue
        d = (t - p) / (t - p).norm()
        pr, pc = int(p[0]), int(p[1])
        r1, r2 = max(0, pr - radius), min(H, pr + radius + 1)
        c1, c2 = max(0, pc - radius), min(W, pc + radius + 1)
        src = F1[:, :, r1:r2, c1:c2].detach()
        d = d.to(F1.device)
        tgt = sample_patch(F1, r1 + d[0], c1 + d[1], r2 - r1, c2 - c1)
        loss = loss + (2 * radius + 1) ** 2 * F.l1_loss(src, tgt)
    return loss


def mask_preservation_loss(x_prev: torch.Tensor, x_prev_ref: torch.Tensor,
                           mask: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * SUM |x_prev - x_prev_ref| * (1 - mask) over all latent elements.

    A sum, not a mean (NOTES section 2 step 5), on the one-step-denoised latents at t - 20.
    """
    return lam * ((x_prev - x_prev_ref) * (1.0 - mask)).abs().sum()


def all_reached(handles: torch.Tensor, targets: torch.Tensor, reached: float = 2.0) -> bool:
    """The stop rule: every handle within Euclidean distance < ``reached`` of its target."""
    return bool(((targets - handles).norm(dim=-1) < reached).all())
