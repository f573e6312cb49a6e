"""Point matching and Mean Distance (docs/evaluation.md section 2, steps 1 and 4-7).

For each handle, the source feature vector at the handle pixel is compared by cosine similarity
with every pixel of the edited image's feature map, both maps bilinearly upsampled to the
source size; the match is the global argmax (no window, no mask; ties go to the first pixel in
row-major order); its distance to the target, in source pixels, is one entry of the Mean
Distance, which pools *pairs* of all images (an image with 6 pairs weighs 6 times).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["points_rc", "upsample", "unit_features", "Matches", "match_handles", "pair_distances",
           "mean_distance"]


def points_rc(points_xy) -> tuple[torch.Tensor, torch.Tensor]:
    """Clicks ``[[x, y], ...]`` (handle, target, ...) -> int64 ``(K, 2)`` handles and targets as
    ``(row, col) = (y, x)`` (step 1). The reference indexes with the integer clicks directly;
    non-integer clicks (not in DragBench) are rounded to the nearest pixel."""
    p = torch.as_tensor(np.asarray(points_xy, dtype=np.float64))
    rc = torch.round(p.flip(-1)).long()
    return rc[0::2], rc[1::2]


def upsample(ft: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Step 4: ``F.interpolate(ft, (H, W), mode='bilinear')`` (align_corners False, no antialias)."""
    return F.interpolate(ft, tuple(int(s) for s in size_hw), mode="bilinear")


@dataclass
class Matches:
    """Step 5 for the ``K`` handles of one image.

    Attributes:
        match_rc: int64 ``(K, 2)`` matched ``(row, col)``.
        cos_max: float32 ``(K,)`` cosine at the match.
        src_vec: float32 ``(K, C)`` source feature at each handle.
        cos_gap: float32 ``(K,)`` ``cos_max`` minus the largest value strictly below it
            (the argmax margin; a diagnostic).
        ties: int64 ``(K,)`` pixels whose cosine equals ``cos_max`` exactly.
    """

    match_rc: torch.Tensor
    cos_max: torch.Tensor
    src_vec: torch.Tensor
    cos_gap: torch.Tensor
    ties: torch.Tensor

    @property
    def match_xy(self) -> torch.Tensor:
        return self.match_rc.flip(-1)


def unit_features(ft: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``ft / max(||ft||_C, eps)`` per pixel: the per-pixel half of ``nn.CosineSimilarity``.

    PyTorch's ``cosine_similarity(x1, x2, dim=1)`` computes ``((x1 / max(|x1|, eps)) *
    (x2 / max(|x2|, eps))).sum(1)``; normalising the edited map once and reusing it for every
    handle gives the same float32 values bit for bit (checked in the tests) without redoing the
    ``C x H x W`` norm per handle, which dominates on SD-2.1's 1280 channels.
    """
    return ft / torch.linalg.vector_norm(ft, 2, dim=1, keepdim=True).clamp_min(eps)


def match_handles(src_up: torch.Tensor, drg_up: torch.Tensor, handles_rc: torch.Tensor,
                  diagnostics: bool = True, drg_unit: torch.Tensor | None = None) -> Matches:
    """Global cosine argmax of each handle's source feature over the edited map (step 5).

    Args:
        src_up: ``[1, C, H, W]`` upsampled source features.
        drg_up: ``[1, C, H, W]`` upsampled features of the (resized) edited image (may be None
            when ``drg_unit`` is given).
        handles_rc: int64 ``(K, 2)`` handle ``(row, col)`` in source pixels.
        diagnostics: compute ``cos_gap`` and ``ties`` (NaN / 0 if False).
        drg_unit: :func:`unit_features` of ``drg_up``, if already computed.

    Returns:
        :class:`Matches`.
    """
    c = src_up.shape[1]
    x2n = unit_features(drg_up) if drg_unit is None else drg_unit
    rows, cmax, vecs, gaps, ties = [], [], [], [], []
    for r, col in handles_rc.tolist():
        src_vec = src_up[0, :, r, col].view(1, c, 1, 1)
        # nn.CosineSimilarity(dim=1)(src_vec, drg_up), eps 1e-8 (see unit_features)
        cos = ((src_vec / torch.linalg.vector_norm(src_vec, 2, dim=1, keepdim=True).clamp_min(1e-8))
               * x2n).sum(1)
        cos_map = cos.cpu().numpy()[0]
        flat = int(cos_map.argmax())  # numpy: first maximum in row-major order (as the script)
        rc = np.unravel_index(flat, cos_map.shape)
        best = cos_map[rc]
        rows.append([int(rc[0]), int(rc[1])])
        cmax.append(best)
        vecs.append(src_vec.view(c).float().cpu())
        if diagnostics:
            below = cos_map[cos_map < best]
            gaps.append(best - below.max() if below.size else np.float32("nan"))
            ties.append(int((cos_map == best).sum()))
        else:
            gaps.append(np.float32("nan"))
            ties.append(0)
    return Matches(match_rc=torch.tensor(rows, dtype=torch.int64).view(-1, 2),
                   cos_max=torch.tensor(np.asarray(cmax, np.float32)),
                   src_vec=torch.stack(vecs) if vecs else torch.zeros(0, c),
                   cos_gap=torch.tensor(np.asarray(gaps, np.float32)),
                   ties=torch.tensor(ties, dtype=torch.int64))


def pair_distances(targets_rc: torch.Tensor, match_rc: torch.Tensor) -> torch.Tensor:
    """Step 6: float32 Euclidean distance per pair, ``(target_rc - match_rc).float().norm()``."""
    return torch.stack([(t - m).float().norm() for t, m in zip(targets_rc, match_rc)]) \
        if len(targets_rc) else torch.zeros(0)


def mean_distance(distances) -> float:
    """Step 7: MD = ``torch.tensor(all_dist).mean()`` over all pairs of all images (float32).

    Args:
        distances: per-pair distances: one flat sequence, or a list of per-image tensors.
    """
    flat = [d.reshape(-1) if isinstance(d, torch.Tensor) else torch.tensor(d, dtype=torch.float32).reshape(-1)
            for d in distances] if len(distances) else []
    if not flat:
        return float("nan")
    return float(torch.cat([f.float() for f in flat]).mean())
