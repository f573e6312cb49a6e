"""DragonDiffusion's inputs on its own grids: working size, masks, point patches, latent edits.

The authors' app (``MC-E/DragonDiffusion``, ``src/utils/utils.py`` and ``src/demo/model.py``)
resizes the upload to a *working size* whose sides are multiples of 64, multiplies clicks by
``input_scale = new_width / original_width`` (x **and** y), and describes every edit by boolean
masks on a *feature grid* at ``1 / scale`` of the working image (scale = 4 with the default
features ``up_blocks[1], up_blocks[2]`` upsampled x2). Everything here reproduces that arithmetic
(docs/methods.md, DragonDiffusion 12a-15), reference bugs included, each marked where it
happens:

- x is clipped with the feature grid's *height* (DragonDiffusion 13);
- the 3 x 3 latent patch copy is done in place on the latent the sampler also uses as its
  step-0 reference (DragonDiffusion 14);
- ``move`` and ``paste`` roll the latent by shifts that ignore ``input_scale`` while their
  masks use it (see :func:`move_latent`, :func:`paste_latent`).

Masks arrive as the app receives them: ``uint8`` 0/255 at the upload size. They are resized with
:func:`cv2_resize_linear`, a re-implementation of OpenCV's ``INTER_LINEAR`` for ``uint8`` (11-bit
fixed-point weights), so that thresholds at 0.5 land on the same pixels as ``cv2.resize`` without
depending on OpenCV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "cv2_resize_linear", "binary_from_upload", "feature_scale",
    "DragRegions", "process_drag", "copy_latent_patches", "MoveRegions", "process_move",
    "move_latent", "BlendRegions", "process_appearance", "process_paste", "paste_latent",
    "paste_image", "latent_mask",
]

_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS


# -- working size --------------------------------------------------------------------------

# -- OpenCV's bilinear resize for uint8 ----------------------------------------------------

def _linear_taps(src: int, dst: int, clamp: bool) -> tuple[np.ndarray, np.ndarray]:
    """First source index and 11-bit weights (w0, w1) per output index, as ``cv::resize``
    builds them: ``f = float32((d + 0.5) * src / dst - 0.5)``, ``s = floor(f)``; columns are
    clamped to the image (``clamp``), rows are not (their taps are border-replicated)."""
    scale = 1.0 / (dst / src)
    idx = np.empty(dst, np.int64)
    wts = np.empty((dst, 2), np.int64)
    for d in range(dst):
        f = np.float32((d + 0.5) * scale - 0.5)
        s = math.floor(f)
        f = np.float32(f - np.float32(s))
        if clamp and s < 0:
            f, s = np.float32(0.0), 0
        if clamp and s >= src - 1:
            f, s = np.float32(0.0), src - 1
        w0 = np.float32(np.float32(1.0) - f)
        # saturate_cast<short>(float) rounds half to even
        wts[d] = (int(np.rint(w0 * _COEF_SCALE)), int(np.rint(f * _COEF_SCALE)))
        idx[d] = s
    return idx, wts


def cv2_resize_linear(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """``cv2.resize(img, (W, H), interpolation=INTER_LINEAR)`` for ``uint8`` (H, W[, C]).

    Bit-exact with OpenCV 4.11 on x86 (checked against it on random masks and sizes): 11-bit
    fixed-point horizontal taps (columns clamped), then the vectorised vertical pass
    ``((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16) + 2 >> 2`` with unclamped row weights
    on border-replicated rows. An exact 2x reduction is OpenCV's area average; an unchanged size
    is a copy.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"cv2_resize_linear expects uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]      # OpenCV returns single-channel images as (H, W)
    H, W = int(size_hw[0]), int(size_hw[1])
    h, w = img.shape[:2]
    if (h, w) == (H, W):
        return img.copy()
    src = img.astype(np.int64)
    if h == 2 * H and w == 2 * W:  # INTER_LINEAR with both scales exactly 2 -> INTER_AREA
        s = src[0::2, 0::2] + src[1::2, 0::2] + src[0::2, 1::2] + src[1::2, 1::2]
        return ((s + 2) >> 2).astype(np.uint8)
    xi, xw = _linear_taps(w, W, clamp=True)
    yi, yw = _linear_taps(h, H, clamp=False)
    x1 = np.minimum(xi + 1, w - 1)
    extra = (None,) * (img.ndim - 2)
    rows = src[:, xi] * xw[(slice(None), 0) + extra] + src[:, x1] * xw[(slice(None), 1) + extra]
    s0 = rows[np.clip(yi, 0, h - 1)] >> 4
    s1 = rows[np.clip(yi + 1, 0, h - 1)] >> 4
    b0 = yw[(slice(None), 0, None) + extra]
    b1 = yw[(slice(None), 1, None) + extra]
    out = (((s0 * b0) >> 16) + ((s1 * b1) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def binary_from_upload(mask: np.ndarray, size_hw: tuple[int, int]) -> torch.Tensor:
    """The reference's ``mask_x0``: a 0/255 mask, cv2-resized (bilinear) to the working size,
    the first channel after BGR->RGB (all channels are equal), ``> 0.5`` -> float (H, W)."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., -1]      # BGR -> RGB makes the last channel the first
    r = cv2_resize_linear(m.astype(np.uint8), size_hw)
    return (torch.from_numpy(r.astype(np.float32)) > 0.5).float()


def as_upload_mask(mask01: np.ndarray) -> np.ndarray:
    """A DragSample mask (0/1) as the app receives it (0/255 uint8)."""
    return (np.asarray(mask01) > 0).astype(np.uint8) * 255


def feature_scale(up_ft_index, up_scale: int, sizes: dict[int, int] | None = None) -> float:
    """``scale = 8 * SIZES[max(up_ft_index)] / up_scale``: image pixels per feature-grid pixel.

    ``SIZES[k]`` is how many times smaller than the latent ``up_blocks[k]``'s output is (4, 2, 1, 1
    for SD 1.5); pass ``sizes`` computed from the UNet for other topologies.
    """
    sizes = sizes or {0: 4, 1: 2, 2: 1, 3: 1}
    return 8 * sizes[max(int(i) for i in up_ft_index)] / up_scale


def nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate`` default (nearest) of a (H, W) or (1, 1, H, W) mask to ``size``."""
    m = mask.float()
    while m.dim() < 4:
        m = m[None]
    return F.interpolate(m, size=(int(size[0]), int(size[1])))


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int], threshold: float = 0.0) -> torch.Tensor:
    """Mask nearest-resized to the latent, ``> threshold``, as float (1, 1, h, w)."""
    return (nearest(mask, latent_hw) > threshold).float()


# -- drag ----------------------------------------------------------------------------------

@dataclass
class DragRegions:
    """``process_drag``'s output: the masks of a point-drag edit.

    Attributes:
        mask_x0: (H, W) float 0/1 user mask at the working size (M for the guidance mix).
        mask_other: (1, 1, Hf, Wf) bool, the unedited (content) region.
        handle_patches: (N, Hf, Wf) bool 3x3 patches at the handles (the reference's
            ``mask_tar``).
        target_patches: (N, Hf, Wf) bool 3x3 patches at the targets (``mask_cur``).
        handle_rc, target_rc: clipped feature coordinates (row, col) per point.
        input_scale: working width / upload width.
    """

    mask_x0: torch.Tensor
    mask_other: torch.Tensor
    handle_patches: torch.Tensor
    target_patches: torch.Tensor
    handle_rc: list[tuple[int, int]] = field(default_factory=list)
    target_rc: list[tuple[int, int]] = field(default_factory=list)
    input_scale: float = 1.0

    def to(self, device) -> "DragRegions":
        return _to(self, device)


def _clip_feature(coord: float, scale: float, bound: int) -> int:
    return int(np.clip(coord // scale, 1, bound - 2))


def process_drag(mask_upload: np.ndarray, points_xy, working_hw: tuple[int, int],
                 input_scale: float, scale: float) -> DragRegions:
    """Masks and point patches of a drag (``run_drag`` point scaling + ``process_drag``).

    Args:
        mask_upload: user mask at the upload size, uint8 0/255 ((H0, W0) or (H0, W0, 3)).
        points_xy: clicks (x, y) in upload pixels, alternating handle, target.
        working_hw: working size (H, W).
        input_scale: working width / upload width (applied to x and y).
        scale: image pixels per feature pixel (:func:`feature_scale`).
    """
    H, W = working_hw
    mask_x0 = binary_from_upload(mask_upload, (H, W))
    hf, wf = int(H // scale), int(W // scale)
    mask_other = nearest(mask_x0, (hf, wf)) < 0.5
    pts = [(float(x) * input_scale, float(y) * input_scale) for x, y in points_xy]
    handles, targets = pts[0::2], pts[1::2]
    hp, tp, hrc, trc = [], [], [], []
    for (xh, yh), (xt, yt) in zip(handles, targets):
        # reference bug: x is clipped with the feature grid's height (docs/methods.md,
        # DragonDiffusion 13)
        rh, ch = _clip_feature(yh, scale, hf), _clip_feature(xh, scale, hf)
        rt, ct = _clip_feature(yt, scale, hf), _clip_feature(xt, scale, hf)
        m_h = torch.zeros(hf, wf)
        m_t = torch.zeros(hf, wf)
        m_h[rh - 1:rh + 2, ch - 1:ch + 2] = 1
        m_t[rt - 1:rt + 2, ct - 1:ct + 2] = 1
        hp.append(m_h > 0.5)
        tp.append(m_t > 0.5)
        hrc.append((rh, ch))
        trc.append((rt, ct))
    return DragRegions(mask_x0, mask_other, torch.stack(hp), torch.stack(tp), hrc, trc,
                       float(input_scale))


def copy_latent_patches(latent: torch.Tensor, regions: DragRegions, up_scale: int,
                        border: str = "error") -> torch.Tensor:
    """In place, for each pair in order: the 3x3 latent patch at the target <- the handle's.

    Coordinates are the clipped feature coordinates ``// up_scale`` (DragonDiffusion 14), with
    Python slice semantics (a patch at row 0 starts at -1 and is empty, one at the last row is
    cut short, a one-row patch broadcasts). The assignment is the reference's own tensor
    operation, so overlapping handle/target patches copy exactly as there (memory order, no
    snapshot).

    Where the two patches cannot be matched (a point near the latent's bottom/right border, where
    the authors' code raises), ``border="error"`` (faithful) raises a clear error and
    ``border="clip"`` copies the part of the 3x3 window that lies inside the latent at both ends.
    Returns ``latent`` (modified in place, as the reference modifies the inversion's last latent).
    """
    if border not in ("error", "clip"):
        raise ValueError(f"latent patch border must be 'error' or 'clip', got {border!r}")
    h, w = latent.shape[-2:]
    for k, ((rh, ch), (rt, ct)) in enumerate(zip(regions.handle_rc, regions.target_rc)):
        yh, xh, yt, xt = rh // up_scale, ch // up_scale, rt // up_scale, ct // up_scale
        dst = (slice(yt - 1, yt + 2), slice(xt - 1, xt + 2))
        src = (slice(yh - 1, yh + 2), slice(xh - 1, xh + 2))
        try:
            latent[..., dst[0], dst[1]] = latent[..., src[0], src[1]]
            continue
        except RuntimeError as exc:
            if border == "error":
                raise ValueError(
                    f"point pair {k}: the handle's latent patch "
                    f"{tuple(latent[..., src[0], src[1]].shape[-2:])} cannot be copied onto the "
                    f"target's {tuple(latent[..., dst[0], dst[1]].shape[-2:])} (a point near the "
                    "latent's border; the authors' code fails here too): move the point inwards "
                    "or set method.latent_copy_border=clip") from exc
        dys = [d for d in (-1, 0, 1) if 0 <= yh + d < h and 0 <= yt + d < h]
        dxs = [d for d in (-1, 0, 1) if 0 <= xh + d < w and 0 <= xt + d < w]
        if dys and dxs:
            latent[..., yt + dys[0]:yt + dys[-1] + 1, xt + dxs[0]:xt + dxs[-1] + 1] = \
                latent[..., yh + dys[0]:yh + dys[-1] + 1, xh + dxs[0]:xh + dxs[-1] + 1]
    return latent


# -- move / resize ---------------------------------------------------------------------------

@dataclass
class MoveRegions:
    """``process_move``'s output (docs/methods.md, DragonDiffusion 12a).

    Feature-grid masks are (1, 1, h, w) bool; ``mask_tar`` keeps its own (resized) size."""

    mask_x0: torch.Tensor
    mask_x0_ref: torch.Tensor | None
    mask_tar: torch.Tensor
    mask_cur: torch.Tensor
    mask_other: torch.Tensor
    mask_overlap: torch.Tensor
    mask_non_overlap: torch.Tensor
    resize_scale: float = 1.0

    def to(self, device) -> "MoveRegions":
        return _to(self, device)


def process_move(mask_upload: np.ndarray, working_hw: tuple[int, int], dx: float, dy: float,
                 scale: float, input_scale: float, resize_scale: float,
                 mask_ref_upload: np.ndarray | None = None) -> MoveRegions:
    """Masks of an object move / resize (``process_move``).

    ``dx, dy`` (target - handle of the first click pair, upload pixels) are multiplied by
    ``input_scale``; the shift on the feature grid is ``int(d // scale * resize_scale)``.
    ``torch.roll`` wraps around; ``resize_scale > 1`` crops the grown mask to the grid size and
    refuses (as the reference does) when that crop loses part of the object.
    """
    H, W = working_hw
    dx, dy = dx * input_scale, dy * input_scale
    mask_x0 = binary_from_upload(mask_upload, (H, W))
    mask_x0_ref = None if mask_ref_upload is None else binary_from_upload(mask_ref_upload, (H, W))
    mask_org = nearest(mask_x0, (int(H // scale), int(W // scale))) > 0.5
    mask_tar = nearest(mask_x0, (int(H // scale * resize_scale), int(W // scale * resize_scale))) > 0.5
    mask_cur = torch.roll(mask_tar, (int(dy // scale * resize_scale), int(dx // scale * resize_scale)),
                          (-2, -1))
    pad_x = abs(mask_tar.shape[-1] - mask_org.shape[-1]) // 2
    pad_y = abs(mask_tar.shape[-2] - mask_org.shape[-2]) // 2
    if resize_scale > 1:
        before = int(mask_cur.sum())
        mask_cur = mask_cur[:, :, pad_y:pad_y + mask_org.shape[-2], pad_x:pad_x + mask_org.shape[-1]]
        if int(mask_cur.sum()) != before:
            raise ValueError(f"resize_scale={resize_scale} with shift ({dx:g}, {dy:g}) puts part of "
                             "the object outside the image (the authors' code stops here too)")
    else:
        canvas = torch.zeros(1, 1, *mask_org.shape[-2:])
        canvas[:, :, pad_y:pad_y + mask_cur.shape[-2], pad_x:pad_x + mask_cur.shape[-1]] = mask_cur.float()
        mask_cur = canvas > 0.5
    mask_other = (1 - ((mask_cur.float() + mask_org.float()) > 0.5).float()) > 0.5
    mask_overlap = ((mask_cur.float() + mask_org.float()) > 1.5).float()
    mask_non_overlap = (mask_org.float() - mask_overlap) > 0.5
    return MoveRegions(mask_x0, mask_x0_ref, mask_tar, mask_cur, mask_other, mask_overlap > 0.5,
                       mask_non_overlap, float(resize_scale))


def move_latent(latent: torch.Tensor, mask_upload: np.ndarray, working_hw: tuple[int, int],
                dx: float, dy: float, resize_scale: float) -> torch.Tensor:
    """``run_move``'s z_T pre-processing: paste the (resized, rolled) object latent into z_T.

    Reference quirks kept: the mask is taken at the *upload* size, and the shift is
    ``int(d / (H / h) * resize_scale)`` with the *unscaled* click offset ``d`` and the working
    height H for both axes.
    """
    h, w = latent.shape[-2:]
    H = working_hw[0]
    m = np.asarray(mask_upload)
    m = m[..., -1] if m.ndim == 3 else m
    size = (int(h * resize_scale), int(w * resize_scale))
    mask_tmp = (nearest(torch.from_numpy(m.astype(np.float32)), size) > 0).to(latent.device, latent.dtype)
    lat_tmp = F.interpolate(latent, size=size)
    shift = (int(dy / (H / h) * resize_scale), int(dx / (H / h) * resize_scale))
    mask_tmp = torch.roll(mask_tmp, shift, (-2, -1))
    lat_tmp = torch.roll(lat_tmp, shift, (-2, -1))
    pad_x = abs(mask_tmp.shape[-1] - w) // 2
    pad_y = abs(mask_tmp.shape[-2] - h) // 2
    if resize_scale > 1:
        before = float(mask_tmp.sum())
        mask_tmp = mask_tmp[:, :, pad_y:pad_y + h, pad_x:pad_x + w]
        lat_tmp = lat_tmp[:, :, pad_y:pad_y + h, pad_x:pad_x + w]
        if float(mask_tmp.sum()) != before:
            raise ValueError(f"resize_scale={resize_scale}: the resized object leaves the image")
    elif resize_scale < 1:
        canvas = torch.zeros(1, 1, h, w, dtype=latent.dtype, device=latent.device)
        canvas[:, :, pad_y:pad_y + mask_tmp.shape[-2], pad_x:pad_x + mask_tmp.shape[-1]] = mask_tmp
        mask_tmp = (canvas > 0.5).to(latent.dtype)
        canvas = torch.zeros_like(latent)
        canvas[:, :, pad_y:pad_y + lat_tmp.shape[-2], pad_x:pad_x + lat_tmp.shape[-1]] = lat_tmp
        lat_tmp = canvas
    return latent * (1 - mask_tmp) + lat_tmp * mask_tmp


# -- appearance / paste --------------------------------------------------------------------

@dataclass
class BlendRegions:
    """``process_appearance`` / ``process_paste`` output.

    Attributes:
        mask_base_cur: (1, 1, Hf, Wf) bool, where the edited object is in the result.
        mask_replace_cur: (1, 1, Hf, Wf) bool, where it is in the second image.
        base, replace: working-size float masks the memory-bank attention uses
            (the reference's ``dict_mask``; values 0..255 for appearance, 0/1 for paste).
    """

    mask_base_cur: torch.Tensor
    mask_replace_cur: torch.Tensor
    base: torch.Tensor
    replace: torch.Tensor

    def to(self, device) -> "BlendRegions":
        return _to(self, device)


def _to(regions, device):
    """A copy of a regions dataclass with every tensor on ``device``."""
    from dataclasses import fields, replace

    return replace(regions, **{f.name: getattr(regions, f.name).to(device) for f in fields(regions)
                               if torch.is_tensor(getattr(regions, f.name))})


def _upload_float(mask: np.ndarray, size_hw) -> torch.Tensor:
    m = np.asarray(mask)
    m = m[..., -1] if m.ndim == 3 else m
    return torch.from_numpy(cv2_resize_linear(m.astype(np.uint8), size_hw).astype(np.float32))


def process_appearance(mask_base_upload: np.ndarray, mask_replace_upload: np.ndarray,
                       working_hw: tuple[int, int], scale: float) -> BlendRegions:
    """Masks of an appearance replacement (``process_appearance``)."""
    H, W = working_hw
    base = _upload_float(mask_base_upload, (H, W))
    replace = _upload_float(mask_replace_upload, (H, W))
    grid = (int(H // scale), int(W // scale))
    return BlendRegions(nearest(base > 0.5, grid) > 0.5, nearest(replace > 0.5, grid) > 0.5,
                        base, replace)


def _center_resize(t: torch.Tensor, resize_scale: float) -> torch.Tensor:
    """Nearest resize by ``resize_scale`` then centre crop (> 1) or centre pad with 0 (< 1)."""
    hi, wi = t.shape[-2:]
    r = F.interpolate(t, size=(int(hi * resize_scale), int(wi * resize_scale)))
    pad_x = abs(r.shape[-1] - wi) // 2
    pad_y = abs(r.shape[-2] - hi) // 2
    if resize_scale > 1:
        return r[:, :, pad_y:pad_y + hi, pad_x:pad_x + wi]
    canvas = torch.zeros(t.shape[0], t.shape[1], hi, wi, dtype=t.dtype)
    canvas[:, :, pad_y:pad_y + r.shape[-2], pad_x:pad_x + r.shape[-1]] = r
    return canvas


def process_paste(mask_upload: np.ndarray, working_hw: tuple[int, int], dx: float, dy: float,
                  scale: float, input_scale: float, resize_scale: float = 1.0) -> BlendRegions:
    """Masks of an object paste (``process_paste``): the object's mask on the second image,
    resized about the centre by ``resize_scale`` and rolled by (dy, dx) * input_scale."""
    H, W = working_hw
    dx, dy = dx * input_scale, dy * input_scale
    m = (_upload_float(mask_upload, (H, W)) > 0.5).float()[None, None]
    if resize_scale is not None and resize_scale != 1:
        m = _center_resize(m, resize_scale)
    replace = m.clone()
    base = torch.roll(m, (int(dy), int(dx)), (-2, -1))
    base_cur = nearest(base, (int(H // scale), int(W // scale))) > 0.5
    replace_cur = torch.roll(base_cur, (-int(dy / scale), -int(dx / scale)), (-2, -1))
    return BlendRegions(base_cur, replace_cur, base[0, 0], replace[0, 0])


def paste_image(image: np.ndarray, resize_scale: float) -> torch.Tensor:
    """``run_paste``'s second image as a tensor in [-1, 1], resized about its centre (nearest)."""
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    t = (t - 0.5) * 2
    return _center_resize(t, resize_scale) if resize_scale != 1 else t


def paste_latent(latent_base: torch.Tensor, latent_replace: torch.Tensor, regions: BlendRegions,
                 working_hw: tuple[int, int], dx: float, dy: float) -> torch.Tensor:
    """``run_paste``'s z_T: the second image's z_T rolled by ``int(d / (H / h))`` (unscaled
    offsets, working height for both axes) pasted into the base z_T inside ``mask_base_cur``."""
    h, w = latent_base.shape[-2:]
    H = working_hw[0]
    mask_tmp = (nearest(regions.mask_base_cur, (h, w)) > 0).to(latent_base.dtype)
    tmp = torch.roll(latent_replace, (int(dy / (H / h)), int(dx / (H / h))), (-2, -1))
    return latent_base * (1 - mask_tmp) + tmp * mask_tmp
