"""Drag samples made in code: simple textured shapes on gradients with known drags.

No files and no downloads, so tests and smoke runs always have data. Every scene is
deterministic for a given ``(seed, index, size)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .sample import DragSample, SampleSource, checked_count, checked_size, validate_sample

__all__ = ["ProceduralSamples"]

_COLOURS = {
    "red": (210, 40, 35),
    "green": (40, 170, 60),
    "yellow": (235, 200, 40),
    "orange": (235, 130, 40),
    "purple": (120, 60, 160),
    "blue": (40, 80, 190),
    "grey": (128, 128, 135),
    "white": (235, 235, 230),
}


@dataclass(frozen=True)
class _Recipe:
    shape: str  # disc | square | triangle | ellipse
    action: str  # name suffix, e.g. "stretch_right"
    fg: str
    bg: str
    bg2: str
    masked: bool


# Index i uses recipe i % len(_RECIPES); a repeat gets a numeric suffix so names stay unique.
_RECIPES = (
    _Recipe("disc", "stretch_right", "red", "blue", "white", True),
    _Recipe("square", "move_up", "green", "orange", "yellow", False),
    _Recipe("triangle", "raise_apex", "yellow", "purple", "blue", True),
    _Recipe("ellipse", "widen", "orange", "green", "white", True),
    _Recipe("disc", "move_down_left", "purple", "yellow", "white", False),
)


def _shape_mask(kind: str, geo: dict, h: int, w: int, dx: float = 0.0, dy: float = 0.0,
                grow: float = 0.0) -> np.ndarray:
    """Boolean mask of a shape, optionally shifted by (dx, dy) and grown by ``grow`` pixels."""
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    cx, cy = geo["cx"] + dx, geo["cy"] + dy
    if kind in ("disc", "ellipse"):
        rx, ry = geo["rx"] + grow, geo["ry"] + grow
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif kind == "square":
        r = geo["rx"] + grow
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "triangle":
        pts = [(x + dx, y + dy) for x, y in geo["verts"]]
        d.polygon(pts, fill=255)
        if grow > 0:  # grow by stroking the outline
            d.line(pts + [pts[0]], fill=255, width=max(1, int(round(2 * grow))), joint="curve")
    else:  # pragma: no cover - recipes are fixed
        raise ValueError(kind)
    return np.asarray(im) > 0


class ProceduralSamples(SampleSource):
    """Synthetic drag samples: a coloured gradient background and one textured shape
    (disc / square / triangle / ellipse) with known handle/target pairs.

    Scenes cycle through: ``disc_stretch_right`` (drag the disc's right edge further right),
    ``square_move_up`` (drag the square's centre up; all-zero mask = "no mask"),
    ``triangle_raise_apex``, ``ellipse_widen`` (two pairs: left edge left, right edge right) and
    ``disc_move_down_left`` (no mask). Masks cover the shape plus the region it is dragged into.
    Beyond five samples the scenes repeat with fresh random colours/positions and a ``_<k>``
    name suffix.

    Args:
        n: Number of samples.
        size: ``(H, W)``; any size from 16 x 16, non-square and non-multiples of 8 included.
        seed: Seed; sample ``i`` depends only on ``(seed, i, size)``.
        limit: At most this many of the ``n`` samples (``data.limit``, as for DragBench).
        drop_mask: Hand out every sample without its mask (:class:`SampleSource`).
    """

    def __init__(self, n: int = 2, size: tuple[int, int] = (128, 128), seed: int = 0,
                 limit: int | None = None, drop_mask: bool = False):
        n = checked_count("ProceduralSamples", "n", n, limit)
        h, w = checked_size("ProceduralSamples", "size", size, 16)
        self.n, self.size, self.seed = int(n), (h, w), int(seed)
        self.names = [self._name(i) for i in range(self.n)]
        self.drop_mask = bool(drop_mask)

    @staticmethod
    def _name(i: int) -> str:
        r = _RECIPES[i % len(_RECIPES)]
        k = i // len(_RECIPES)
        return f"{r.shape}_{r.action}" + (f"_{k}" if k else "")

    def _load(self, i: int) -> DragSample:
        recipe = _RECIPES[i % len(_RECIPES)]
        rng = np.random.default_rng([self.seed, i])
        h, w = self.size
        s = min(h, w)

        # Background: a linear gradient between two jittered colours in a random direction.
        c0 = np.clip(np.array(_COLOURS[recipe.bg]) + rng.integers(-20, 21, 3), 0, 255)
        c1 = np.clip(np.array(_COLOURS[recipe.bg2]) + rng.integers(-20, 21, 3), 0, 255)
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        t = (xx / max(w - 1, 1) - 0.5) * np.cos(ang) + (yy / max(h - 1, 1) - 0.5) * np.sin(ang)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        img = (1 - t)[..., None] * c0 + t[..., None] * c1

        # Shape geometry (relative to the shorter side, kept clear of the borders).
        r = s * rng.uniform(0.15, 0.2)
        move = s * rng.uniform(0.12, 0.18)
        cx = w / 2 + rng.uniform(-0.08, 0.08) * w
        cy = h / 2 + rng.uniform(-0.08, 0.08) * h
        geo = {"cx": cx, "cy": cy, "rx": r, "ry": r}
        kind = recipe.shape
        if kind == "ellipse":
            geo["rx"], geo["ry"] = r * 1.1, r * 0.7
        if kind == "triangle":
            geo["verts"] = [(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)]

        if recipe.action == "stretch_right":
            # The target stays 1/7 of the width from the border, where DragonDiffusion's 3x3
            # latent patch still fits at the smallest working size (64 px).
            pairs = [((cx + r, cy), (min(cx + r + move, 6 * w / 7), cy))]
        elif recipe.action == "move_up":
            pairs = [((cx, cy), (cx, cy - move))]
        elif recipe.action == "raise_apex":
            pairs = [((cx, cy - r), (cx, cy - r - move))]
        elif recipe.action == "widen":
            rx = geo["rx"]
            pairs = [((cx - rx, cy), (cx - rx - move, cy)), ((cx + rx, cy), (cx + rx + move, cy))]
        elif recipe.action == "move_down_left":
            pairs = [((cx, cy), (cx - 0.7 * move, cy + 0.7 * move))]
        else:  # pragma: no cover - recipes are fixed
            raise ValueError(recipe.action)

        # Textured shape: jittered colour, stripes and a few darker spots, so features are
        # trackable rather than flat.
        inside = _shape_mask(kind, geo, h, w)
        fg = np.clip(np.array(_COLOURS[recipe.fg]) + rng.integers(-15, 16, 3), 0, 255)
        period = max(3.0, s / rng.uniform(10, 16))
        phase = rng.uniform(0, 2 * np.pi)
        stripes = 0.85 + 0.15 * np.sin(2 * np.pi * (xx + 0.5 * yy) / period + phase)
        tex = fg[None, None, :] * stripes[..., None]
        for _ in range(3):
            sx, sy = cx + rng.uniform(-0.5, 0.5) * r, cy + rng.uniform(-0.4, 0.4) * r
            sr = r * rng.uniform(0.12, 0.22)
            spot = (xx - sx) ** 2 + (yy - sy) ** 2 < sr**2
            tex[spot] *= 0.55
        img[inside] = tex[inside]
        img += rng.normal(0.0, 4.0, img.shape)
        image = np.clip(np.round(img), 0, 255).astype(np.uint8)

        # Points: integer pixels inside the image.
        def clamp(p):
            x, y = p
            return float(min(max(round(x), 0), w - 1)), float(min(max(round(y), 0), h - 1))

        points: list[tuple[float, float]] = []
        for hd, tg in pairs:
            points += [clamp(hd), clamp(tg)]

        # Mask: the shape swept along each drag (the target area included), grown a little.
        mask = np.zeros((h, w), bool)
        if recipe.masked:
            grow = max(1.0, 0.06 * s)
            for (hx, hy), (tx, ty) in pairs:
                for f in np.linspace(0.0, 1.0, 6):
                    mask |= _shape_mask(kind, geo, h, w, f * (tx - hx), f * (ty - hy), grow)

        def a(word: str) -> str:
            return ("an " if word[0] in "aeiou" else "a ") + word

        prompt = f"{a(recipe.fg)} {kind} on {a(recipe.bg)} background"
        return validate_sample(DragSample(
            name=self.names[i], image=image, points=points, mask=mask.astype(np.uint8),
            prompt=prompt, category="procedural",
        ))

    def __repr__(self) -> str:
        return f"ProceduralSamples(n={self.n}, size={self.size}, seed={self.seed})"
