"""A procedural world with ground truth: scenes of a few objects, rendered analytically.

A scene is a background (a two-colour gradient, or a gradient with a faint stripe or checker
texture) and one to three objects (disc, box, star, ring) of solid or striped colour, each with a
position, size, stretch and rotation. Every object is drawn from its signed distance function
with one pixel of anti-aliasing, and its texture lives in the object's own frame, so an object
rendered at a moved, stretched or rotated pose is the *true* edited object, not a resampled one.

:func:`render` draws a scene at any size (non-square and any multiple of 8 included: positions
and sizes are fractions of the image). The toy model (``model=toy``) is trained on
:func:`random_scene`; toybench (:mod:`dragexp.data.toybench`) renders a scene twice, before and
after an edit of one object, to make a drag sample and its ground-truth image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["COLOURS", "SHAPES", "ToyObject", "Scene", "render", "render_object", "random_scene",
           "random_object", "caption"]

# Named so captions can say them; far enough apart that a colour identifies an object.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 40),
    "green": (45, 165, 65),
    "blue": (40, 75, 195),
    "yellow": (235, 205, 45),
    "orange": (240, 135, 35),
    "purple": (125, 55, 165),
    "pink": (235, 120, 175),
    "cyan": (50, 190, 205),
    "white": (240, 240, 235),
    "black": (30, 30, 35),
    "brown": (125, 80, 45),
    "grey": (130, 130, 135),
}
SHAPES = ("disc", "box", "star", "ring")
_BACKGROUND_TEXTURES = ("plain", "stripes", "checker")


@dataclass(frozen=True)
class ToyObject:
    """One object, in image-relative units (``cx``, ``cy`` in [0, 1] of width / height; ``size``
    a fraction of the shorter side: the disc's radius, the box's half-width, the star's outer
    radius, the ring's outer radius).

    ``sx``/``sy`` stretch the object along its own axes, ``angle`` (radians, counter-clockwise
    as seen on screen) rotates it. ``texture`` is ``"solid"`` or ``"stripes"`` (darker bands of
    ``period`` object units at ``phase``, in the object's frame).
    """

    shape: str
    colour: str
    cx: float
    cy: float
    size: float
    sx: float = 1.0
    sy: float = 1.0
    angle: float = 0.0
    texture: str = "solid"
    period: float = 0.4
    phase: float = 0.0

    def centre_px(self, h: int, w: int) -> tuple[float, float]:
        """Centre ``(x, y)`` in pixel coordinates (pixel ``(i, j)`` has its centre at ``(j, i)``)."""
        return self.cx * (w - 1), self.cy * (h - 1)

    def moved(self, dx_px: float, dy_px: float, h: int, w: int) -> "ToyObject":
        """The same object translated by ``(dx, dy)`` pixels."""
        return replace(self, cx=self.cx + dx_px / (w - 1), cy=self.cy + dy_px / (h - 1))

    def point_px(self, u: float, v: float, h: int, w: int) -> tuple[float, float]:
        """Pixel position of the point ``(u, v)`` of the object's own frame (units of ``size``
        before stretch): the map :func:`render` inverts, so a point painted there moves with
        the object."""
        s = self.size * min(h, w)
        x, y = u * self.sx * s, v * self.sy * s
        c, sn = math.cos(self.angle), math.sin(self.angle)
        cx, cy = self.centre_px(h, w)
        # Screen y points down, so a counter-clockwise rotation on screen is (x, -y)-wise.
        return cx + c * x + sn * y, cy - sn * x + c * y


@dataclass(frozen=True)
class Scene:
    """A background and objects drawn in order (the last on top)."""

    bg: str
    bg2: str
    bg_angle: float
    bg_texture: str
    objects: tuple[ToyObject, ...]
    bg_period: float = 0.15


def _polygon_sdf(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from points to a closed polygon (even-odd rule)."""
    d2 = np.full(px.shape, np.inf)
    inside = np.zeros(px.shape, bool)
    n = len(verts)
    for i in range(n):
        ax, ay = verts[i]
        bx, by = verts[(i + 1) % n]
        ex, ey = bx - ax, by - ay
        t = np.clip(((px - ax) * ex + (py - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        d2 = np.minimum(d2, (px - ax - t * ex) ** 2 + (py - ay - t * ey) ** 2)
        crosses = ((ay > py) != (by > py)) & (px < ax + (py - ay) * ex / (ey if ey else 1e-12))
        inside ^= crosses
    return np.where(inside, -1.0, 1.0) * np.sqrt(d2)


def _star_vertices(points: int = 5, inner: float = 0.45) -> np.ndarray:
    k = np.arange(2 * points)
    r = np.where(k % 2 == 0, 1.0, inner)
    a = np.pi / 2 + k * np.pi / points
    return np.stack([r * np.cos(a), -r * np.sin(a)], axis=1)


_STAR = _star_vertices()


def _object_frame(obj: ToyObject, h: int, w: int):
    """Pixel grid in the object's frame (units of its scaled size) and the pixels per unit."""
    s = obj.size * min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = obj.centre_px(h, w)
    dx, dy = xx - cx, yy - cy
    c, sn = math.cos(obj.angle), math.sin(obj.angle)
    # Inverse of ToyObject.point_px.
    x = c * dx - sn * dy
    y = sn * dx + c * dy
    return x / (obj.sx * s), y / (obj.sy * s), s * min(obj.sx, obj.sy)


def render_object(obj: ToyObject, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The object alone: ``(rgb float (H, W, 3) in 0..255, coverage float (H, W) in [0, 1])``.

    Coverage is ``clip(0.5 - d, 0, 1)`` of the signed distance ``d`` in pixels: one pixel of
    anti-aliasing, so sub-pixel moves change the image smoothly.
    """
    u, v, px_per_unit = _object_frame(obj, h, w)
    if obj.shape == "disc":
        d = np.hypot(u, v) - 1.0
    elif obj.shape == "box":
        qx, qy = np.abs(u) - 1.0, np.abs(v) - 0.8
        d = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    elif obj.shape == "star":
        d = _polygon_sdf(u, v, _STAR)
    elif obj.shape == "ring":
        d = np.abs(np.hypot(u, v) - 0.72) - 0.28
    else:
        raise ValueError(f"ToyObject.shape: {obj.shape!r} is not one of {SHAPES}")
    coverage = np.clip(0.5 - d * px_per_unit, 0.0, 1.0)
    base = np.asarray(COLOURS[obj.colour], np.float64)
    if obj.texture == "stripes":
        band = 0.5 + 0.5 * np.sin(2 * np.pi * (u + 0.6 * v) / obj.period + obj.phase)
        shade = 1.0 - 0.45 * band
    elif obj.texture == "solid":
        shade = np.ones_like(u)
    else:
        raise ValueError(f"ToyObject.texture: {obj.texture!r} is not 'solid' or 'stripes'")
    return base[None, None, :] * shade[..., None], coverage


def _background(scene: Scene, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    c0 = np.asarray(COLOURS[scene.bg], np.float64)
    c1 = np.asarray(COLOURS[scene.bg2], np.float64)
    t = ((xx / max(w - 1, 1) - 0.5) * math.cos(scene.bg_angle)
         + (yy / max(h - 1, 1) - 0.5) * math.sin(scene.bg_angle))
    t = np.clip(t + 0.5, 0.0, 1.0)
    img = (1 - t)[..., None] * c0 + t[..., None] * (0.6 * c0 + 0.4 * c1)
    s = scene.bg_period * min(h, w)
    if scene.bg_texture == "stripes":
        img *= (0.92 + 0.08 * np.sign(np.sin(2 * np.pi * (xx - yy) / (2 * s))))[..., None]
    elif scene.bg_texture == "checker":
        img *= (0.93 + 0.07 * ((np.floor(xx / s) + np.floor(yy / s)) % 2 * 2 - 1))[..., None]
    elif scene.bg_texture != "plain":
        raise ValueError(f"Scene.bg_texture: {scene.bg_texture!r} is not one of "
                         f"{_BACKGROUND_TEXTURES}")
    return img


def render(scene: Scene, h: int, w: int) -> np.ndarray:
    """The scene as ``uint8 (H, W, 3)``: background, then each object composited by coverage."""
    img = _background(scene, h, w)
    for obj in scene.objects:
        rgb, cov = render_object(obj, h, w)
        img = img * (1 - cov[..., None]) + rgb * cov[..., None]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def caption(scene: Scene) -> str:
    """The scene in words, naming every object: ``"a red disc and a striped blue star on a
    green background"``."""
    names = [_article(("striped " if o.texture == "stripes" else "") + f"{o.colour} {o.shape}")
             for o in scene.objects]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} on {_article(scene.bg)} background"


def random_object(rng: np.random.Generator, colour: str, shape: str | None = None,
                  size: tuple[float, float] = (0.1, 0.2)) -> ToyObject:
    """An object of a random shape and pose, centred at a random place away from the border."""
    shape = shape or str(rng.choice(SHAPES))
    s = float(rng.uniform(*size))
    return ToyObject(
        shape=shape, colour=colour, cx=float(rng.uniform(0.2, 0.8)), cy=float(rng.uniform(0.2, 0.8)),
        size=s, sx=float(rng.uniform(0.8, 1.25)), sy=float(rng.uniform(0.8, 1.25)),
        angle=float(rng.uniform(-math.pi, math.pi)) if shape in ("box", "star") else 0.0,
        texture="stripes" if rng.random() < 0.35 else "solid",
        period=float(rng.uniform(0.5, 0.9)), phase=float(rng.uniform(0, 2 * math.pi)),
    )


def random_background(rng: np.random.Generator, avoid: set[str] = frozenset()) -> dict:
    """Background fields of a :class:`Scene` whose colours are not in ``avoid``."""
    free = [c for c in COLOURS if c not in avoid]
    bg, bg2 = (str(c) for c in rng.choice(free, size=2, replace=False))
    texture = str(rng.choice(_BACKGROUND_TEXTURES, p=[0.6, 0.2, 0.2]))
    return dict(bg=bg, bg2=bg2, bg_angle=float(rng.uniform(0, 2 * math.pi)), bg_texture=texture,
                bg_period=float(rng.uniform(0.1, 0.2)))


def random_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
    """A random scene of 1..``max_objects`` objects of distinct colours (the training world)."""
    n = int(rng.integers(1, max_objects + 1))
    colours = [str(c) for c in rng.choice(list(COLOURS), size=n + 2, replace=False)]
    objects = tuple(random_object(rng, colours[i]) for i in range(n))
    return Scene(objects=objects, **random_background(rng, avoid=set(colours[:n])))
