"""Pictures of drags: points, numbered arrows, trajectories and masks drawn over an image.

Marks scale with the image (radius and line width grow with the shorter side), so they are
visible on a 128 px test image and on a 512 px DragBench image alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.sample import rgb

__all__ = ["draw_drag", "side_by_side"]

HANDLE_COLOR = (230, 25, 25)
TARGET_COLOR = (30, 70, 235)
ARROW_COLOR = (255, 255, 255)
OUTLINE_COLOR = (0, 0, 0)
TRAJECTORY_COLOR = (255, 215, 0)
MASK_COLOR = (0, 255, 120)
MASK_ALPHA = 0.35

Point = tuple[float, float]


def _as_rgb(image: np.ndarray, what: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{what}: dtype {image.dtype}, expected uint8")
    try:
        return np.ascontiguousarray(rgb(image))
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError, AttributeError):  # Pillow without FreeType / before 10.1
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy, text: str, font, fill, stroke: int) -> None:
    try:
        draw.text(xy, text, fill=fill, font=font, stroke_width=stroke, stroke_fill=OUTLINE_COLOR)
    except (TypeError, ValueError):  # bitmap fonts do not stroke
        draw.text(xy, text, fill=fill, font=font)


def _pts(seq, what: str) -> list[Point]:
    out = []
    for i, p in enumerate(seq):
        if len(p) != 2:
            raise ValueError(f"{what}[{i}] is {p!r}, expected (x, y)")
        out.append((float(p[0]), float(p[1])))
    return out


def draw_drag(
    image: np.ndarray,
    handles: Sequence[Point],
    targets: Sequence[Point],
    trajectories: Sequence[Sequence[Point]] | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Draw a drag edit over an image.

    Layers, bottom to top: the mask (a semi-transparent green tint over editable pixels, only if
    the mask has any), trajectories (yellow polylines, one per handle, through the handle's
    successive positions), arrows handle -> target (white with a dark outline), handles (red
    discs, numbered 1, 2, ... beside them) and targets (blue discs).

    Args:
        image: ``uint8`` ``(H, W, 3)`` (gray and RGBA are converted).
        handles: ``(x, y)`` = (column, row) pixels.
        targets: ``(x, y)``, one per handle.
        trajectories: Optional, per handle, a list of ``(x, y)`` positions.
        mask: Optional ``(H, W)``, > 0 = editable.

    Returns:
        A new ``uint8`` ``(H, W, 3)`` array; the input is not modified.
    """
    img = _as_rgb(image)
    h, w = img.shape[:2]
    handles, targets = _pts(handles, "handles"), _pts(targets, "targets")
    if len(handles) != len(targets):
        raise ValueError(f"{len(handles)} handles but {len(targets)} targets")

    out = img.astype(np.float32)
    if mask is not None:
        m = np.asarray(mask)
        if m.ndim == 3 and m.shape[2] == 1:
            m = m[:, :, 0]
        if m.shape != (h, w):
            raise ValueError(f"mask: shape {tuple(m.shape)} differs from the image size ({h}, {w})")
        sel = m > 0
        if sel.any():
            out[sel] = (1 - MASK_ALPHA) * out[sel] + MASK_ALPHA * np.asarray(MASK_COLOR, np.float32)
    pil = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)

    side = min(h, w)
    r = max(3, round(side / 64))  # point radius: 3 px at 128, 8 px at 512
    lw = max(1, round(side / 170))  # line width: 1 px at 128, 3 px at 512
    ow = max(1, round(lw / 2))  # outline width

    if trajectories is not None:
        for k, traj in enumerate(trajectories):
            pts = _pts(traj, f"trajectories[{k}]")
            if len(pts) >= 2:
                draw.line(pts, fill=TRAJECTORY_COLOR, width=lw, joint="curve")
            dot = max(1, lw)
            for x, y in pts:
                draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=TRAJECTORY_COLOR)

    head = max(4, 2.5 * r)
    for (hx, hy), (tx, ty) in zip(handles, targets):
        dx, dy = tx - hx, ty - hy
        dist = math.hypot(dx, dy)
        if dist < 1e-6:
            continue
        ux, uy = dx / dist, dy / dist
        # stop the shaft at the target disc's rim; the head's tip touches it
        tip = (tx - ux * r, ty - uy * r)
        hl = min(head, max(dist - 2 * r, 0.0))
        base = (tip[0] - ux * hl, tip[1] - uy * hl)
        start = (hx + ux * r, hy + uy * r)
        for width, colour in ((lw + 2 * ow, OUTLINE_COLOR), (lw, ARROW_COLOR)):
            if math.hypot(base[0] - start[0], base[1] - start[1]) > 0 and dist > 2 * r:
                draw.line([start, base], fill=colour, width=width)
        if hl > 0:
            px, py = -uy * hl * 0.5, ux * hl * 0.5
            tri = [tip, (base[0] + px, base[1] + py), (base[0] - px, base[1] - py)]
            draw.polygon(tri, fill=ARROW_COLOR, outline=OUTLINE_COLOR)

    font_px = max(10, round(side / 24))
    font = _font(font_px)
    for k, (x, y) in enumerate(handles):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=HANDLE_COLOR, outline=OUTLINE_COLOR, width=ow)
    for x, y in targets:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=TARGET_COLOR, outline=OUTLINE_COLOR, width=ow)
    for k, (x, y) in enumerate(handles):
        label = str(k + 1)
        # up-left of the handle, kept inside the image
        tx_ = min(max(x - r - 0.6 * font_px * len(label) - 1, 0), max(w - 0.6 * font_px * len(label), 0))
        ty_ = min(max(y - r - font_px - 1, 0), max(h - font_px, 0))
        _text(draw, (tx_, ty_), label, font, (255, 255, 255), stroke=max(1, ow))
    return np.asarray(pil).copy()


def side_by_side(
    images: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    gap: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """Place images left to right, padding shorter ones at the bottom with ``background``.

    Args:
        images: ``uint8`` images (``(H, W, 3)``; gray and RGBA are converted).
        labels: Optional captions, one per image, written in a strip above each.
        gap: Pixels between images.
        background: Padding colour.

    Returns:
        ``uint8`` ``(H_max [+ label strip], sum(W) + gap * (n - 1), 3)``.
    """
    imgs = [_as_rgb(im, f"images[{i}]") for i, im in enumerate(images)]
    if not imgs:
        raise ValueError("side_by_side: no images")
    if labels is not None and len(labels) != len(imgs):
        raise ValueError(f"side_by_side: {len(labels)} labels for {len(imgs)} images")
    hmax = max(im.shape[0] for im in imgs)
    font_px = max(10, round(min(hmax, min(im.shape[1] for im in imgs)) / 24))
    strip = font_px + 6 if labels is not None else 0
    total_w = sum(im.shape[1] for im in imgs) + gap * (len(imgs) - 1)
    canvas = np.empty((hmax + strip, total_w, 3), np.uint8)
    canvas[:] = np.asarray(background, np.uint8)
    x = 0
    offsets = []
    for im in imgs:
        canvas[strip:strip + im.shape[0], x:x + im.shape[1]] = im
        offsets.append(x)
        x += im.shape[1] + gap
    if labels is not None:
        pil = Image.fromarray(canvas, "RGB")
        draw = ImageDraw.Draw(pil)
        font = _font(font_px)
        fg = (0, 0, 0) if sum(background) > 382 else (255, 255, 255)
        for x0, label in zip(offsets, labels):
            draw.text((x0 + 3, 2), str(label), fill=fg, font=font)
        canvas = np.asarray(pil).copy()
    return canvas
