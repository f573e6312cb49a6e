"""Losses of the latent-optimising methods.

DragDiffusion / DragNoise motion supervision and mask term (docs/methods.md, DragDiffusion 3,
steps 4-5; DragNoise 3). EasyDrag's cosine point loss and consistency term, and its
gradient-based auto mask (docs/methods.md, EasyDrag 12-15).
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

    A sum, not a mean (docs/methods.md, DragDiffusion 3, step 5), on the one-step-denoised
    latents at t - 20.
    """
    return lam * ((x_prev - x_prev_ref) * (1.0 - mask)).abs().sum()


def all_reached(handles: torch.Tensor, targets: torch.Tensor, reached: float = 2.0) -> bool:
    """The stop rule: every handle within Euclidean distance < ``reached`` of its target."""
    return bool(((targets - handles).norm(dim=-1) < reached).all())


# -- EasyDrag ---------------------------------------------------------------------------------

def refine_radius(p: torch.Tensor, q: torch.Tensor, r: int, shape) -> tuple[int, int]:
    """EasyDrag's ``refine_r``: the patch half-sizes (r_h, r_w) around points p and q.

    r_h = min(r, int(p_row), int(q_row), H - int(p_row), H - int(q_row)), r_w likewise with the
    columns and W (``shape``'s last two entries; ``int`` truncates). There is no clipping at 0:
    a point outside the map gives a negative radius, as in the authors' code (docs/methods.md,
    EasyDrag 12a).
    """
    H, W = int(shape[-2]), int(shape[-1])
    pr, pc, qr, qc = int(p[0]), int(p[1]), int(q[0]), int(q[1])
    return min(int(r), pr, qr, H - pr, H - qr), min(int(r), pc, qc, W - pc, W - qc)


def cosine_point_loss(F0: torch.Tensor, F1: torch.Tensor, handles_init: torch.Tensor,
                      handles: torch.Tensor, targets: torch.Tensor, radius: int = 0,
                      jump: float = 12.0, snap: float = 18.0, on_target_weight: float = 0.1
                      ) -> torch.Tensor:
    """EasyDrag's generation loss: sum over handles of w / (1 + S).

    S = (mean cos(F1[q], sg(F0[p0])) + 1) / 2 over the patch around q = ``next_point(p, t)``
    (F1, with gradient) and the patch around the *initial* handle p0 (F0, detached), half-sizes
    from :func:`refine_radius` (single pixels with the default radius 0). w = 1, or
    ``on_target_weight`` once the handle sits exactly on its target.
    """
    from .trackers import next_point

    loss = F1.new_zeros(())
    for p0, p, t in zip(handles_init, handles, targets):
        q = next_point(p, t, jump, snap)
        rh, rw = refine_radius(p0, q, radius, F0.shape)
        p0r, p0c, qr, qc = int(p0[0]), int(p0[1]), int(q[0]), int(q[1])
        f0 = F0[:, :, p0r - rh:p0r + rh + 1, p0c - rw:p0c + rw + 1].detach()
        f1 = F1[:, :, qr - rh:qr + rh + 1, qc - rw:qc + rw + 1]
        s = (F.cosine_similarity(f1, f0, dim=1, eps=1e-8).mean() + 1) / 2
        w = on_target_weight if torch.equal(p, t) else 1.0
        loss = loss + w / (1 + 1 * s)
    return loss


def consistency_loss(F0: torch.Tensor, F1: torch.Tensor, mask: torch.Tensor,
                     weight: float = 0.1) -> torch.Tensor | None:
    """EasyDrag's L_share = weight / (1 + S_share) over the pixels outside the editable mask.

    ``mask`` (1, 1, h, w), 1 = editable, any resolution: nearest-resized to the feature map.
    S_share = (sum of per-pixel cos(F0 (1-m), F1 (1-m)) / sum(1 - m) + 1) / 2, where masked
    pixels are zero vectors whose cosine is 0. Returns None (no term) when fewer than one pixel
    is outside the mask. cos(F0, F1) (1 - m) equals the authors' cosine of masked maps for a 0/1
    mask (multiplying by 1 is exact) and saves two feature-sized copies.
    """
    m = mask.to(F1.dtype)
    if tuple(m.shape[-2:]) != tuple(F1.shape[-2:]):
        m = F.interpolate(m, size=tuple(F1.shape[-2:]), mode="nearest")
    keep = 1.0 - m
    n = keep.sum()
    if not bool(n >= 1.0):
        return None
    cos = F.cosine_similarity(F0, F1, dim=1, eps=1e-8) * keep[:, 0]
    s = (cos.sum() / n + 1) / 2
    return weight / (1 + 1 * s)


def gradient_mask(grad: torch.Tensor, threshold: float = 100.0) -> torch.Tensor:
    """EasyDrag's auto mask from the gradient of the point loss w.r.t. z_t (docs/methods.md,
    EasyDrag 13).

    m = |mean over channels of grad[0]|, min-max normalised to 0..255, editable (1) where
    strictly above ``threshold``; returns (1, 1, h, w) float 0/1 at the gradient's resolution.
    A constant gradient gives NaN after the normalisation and so an all-zero mask, as in the
    authors' code.
    """
    g = grad[0].float().mean(0).abs()
    lo, hi = torch.min(g), torch.max(g)
    g = 255 * (g - lo) / (hi - lo)
    return (g > threshold).to(torch.float32)[None, None]
