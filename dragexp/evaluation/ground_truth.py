"""Ground-truth metrics of an edit whose true result is known (toybench, :mod:`dragexp.data.toybench`).

DragBench's metrics ask a feature matcher where the handle's content went; here the true edited
image exists, so the edit is judged on the *output image* itself:

- ``object_error_px``: where the dragged object is in the output. The true edited object (its
  ground-truth pixels where it covers the image, plus a 3-pixel band of what surrounds it, at
  half weight) is slid over the output; the translation of least weighted squared difference,
  refined to sub-pixel by a parabola through its neighbours, is how far the output's object is
  from its true place. 0 means the object is exactly where the edit should have put it; for the
  unedited source it is the distance the object still has to go (the no-edit baseline).
- ``psnr_gt`` / ``ssim_gt``: PSNR (dB) and SSIM (torchmetrics, 0..255 range, Gaussian window 11)
  of the output against the ground-truth image.
- ``psnr_outside_mask`` / ``mae_outside_mask``: preservation: the output against the source
  where the mask is 0 (there the truth is the source itself).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["object_offset", "ground_truth_metrics", "METRICS"]

METRICS = ("object_error_px", "psnr_gt", "ssim_gt", "psnr_outside_mask", "mae_outside_mask")


def _dilate(alpha: torch.Tensor, radius: int) -> torch.Tensor:
    return F.max_pool2d(alpha[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0]


def object_offset(image: np.ndarray, truth: np.ndarray, alpha: np.ndarray,
                  search: int) -> tuple[float, float]:
    """Translation ``(dx, dy)`` that best carries the true object onto ``image``.

    Args:
        image: ``uint8 (H, W, 3)``, the image to look in (an edit's output).
        truth: ``uint8 (H, W, 3)``, the ground-truth image.
        alpha: ``float (H, W)`` in [0, 1], the true object's coverage in ``truth``.
        search: largest translation tried along each axis, in pixels.

    Returns:
        ``(dx, dy)`` in pixels: the object's pixels of ``truth`` at ``p`` are best matched by
        ``image`` at ``p + (dx, dy)``.
    """
    a = torch.as_tensor(alpha, dtype=torch.float64)
    weight = torch.maximum(a, 0.5 * (_dilate((a > 0).double(), 3) > 0).double())
    ys, xs = torch.nonzero(weight > 0, as_tuple=True)
    if len(ys) == 0:
        raise ValueError("object_offset: the ground-truth object covers no pixel")
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    wt = weight[y0:y1, x0:x1]
    tmpl = torch.as_tensor(truth, dtype=torch.float64).permute(2, 0, 1)[:, y0:y1, x0:x1] / 255.0
    img = torch.as_tensor(image, dtype=torch.float64).permute(2, 0, 1) / 255.0
    # Out-of-frame positions read a value no image pixel has, so they never match.
    pad = search
    big = F.pad(img[None], (pad, pad, pad, pad), value=-4.0)[0]
    window = big[:, y0:y1 + 2 * pad, x0:x1 + 2 * pad]
    # sum w (I - T)^2 = sum w I^2 - 2 sum (w T) I + sum w T^2, each sum a correlation.
    sq = F.conv2d((window ** 2).sum(0)[None, None], wt[None, None])[0, 0]
    cross = F.conv2d(window[None], (wt * tmpl)[None])[0, 0]
    cost = (sq - 2 * cross + (wt * tmpl ** 2).sum()) / wt.sum()
    iy, ix = divmod(int(torch.argmin(cost)), cost.shape[1])

    def refine(c_minus: float, c0: float, c_plus: float) -> float:
        denom = c_minus - 2 * c0 + c_plus
        return 0.0 if denom <= 1e-12 else float(np.clip(0.5 * (c_minus - c_plus) / denom, -0.5, 0.5))

    fx = refine(float(cost[iy, ix - 1]), float(cost[iy, ix]), float(cost[iy, ix + 1])) \
        if 0 < ix < cost.shape[1] - 1 else 0.0
    fy = refine(float(cost[iy - 1, ix]), float(cost[iy, ix]), float(cost[iy + 1, ix])) \
        if 0 < iy < cost.shape[0] - 1 else 0.0
    return ix - pad + fx, iy - pad + fy


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ground_truth_metrics(output: np.ndarray, source: np.ndarray, mask: np.ndarray,
                         truth: dict, search: int | None = None) -> dict[str, float]:
    """The metrics of :data:`METRICS` for one output image.

    Args:
        output: ``uint8 (H, W, 3)``, the edited image (or the source, for the no-edit baseline).
        source: ``uint8 (H, W, 3)``, the unedited image.
        mask: ``(H, W)``, nonzero = editable.
        truth: ``extras["ground_truth"]`` of a toybench sample (``image``, ``object_alpha``).
        search: largest translation looked for; default half the shorter side.

    Returns:
        ``{name: value}``; PSNR outside the mask is ``inf`` when nothing changed there.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    gt = np.asarray(truth["image"])
    if output.shape != gt.shape:
        raise ValueError(f"ground_truth_metrics: output of shape {output.shape} differs from "
                         f"the ground truth's {gt.shape}")
    h, w = gt.shape[:2]
    search = search or max(4, min(h, w) // 2)
    dx, dy = object_offset(output, gt, np.asarray(truth["object_alpha"]), search)
    to_t = lambda im: torch.as_tensor(im, dtype=torch.float64).permute(2, 0, 1)[None]  # noqa: E731
    ssim = float(structural_similarity_index_measure(to_t(output), to_t(gt), data_range=255.0))
    outside = np.asarray(mask) == 0
    if outside.any():
        diff = output[outside].astype(np.float64) - source[outside].astype(np.float64)
        mae = float(np.abs(diff).mean())
        mse = float((diff ** 2).mean())
        psnr_out = math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
    else:
        mae, psnr_out = float("nan"), float("nan")
    return {"object_error_px": math.hypot(dx, dy), "psnr_gt": _psnr(output, gt), "ssim_gt": ssim,
            "psnr_outside_mask": psnr_out, "mae_outside_mask": mae}
