"""toybench: drag samples of the procedural world with their ground truth (``data=toybench``).

Each sample is a toy-world scene (:mod:`dragexp.data.toyworld`) and one edit of its top object:

- ``translate``: a handle on the object and a target 12-22% of the image's shorter side away;
  the truth is the object moved by exactly that vector;
- ``stretch``: the handle on the edge of an unrotated disc or box, dragged outwards along an
  axis; the truth is the object stretched along that axis with its opposite edge fixed;
- ``rotate``: the handle on a tip of a star or a corner of a box, dragged along the circle about
  the object's centre by 25-50 degrees; the truth is the object rotated by that angle.

The ground-truth image is the same scene rendered with the edit applied (never a warp of the
source). The other objects are placed clear of the dragged object's old and new footprint, so
the edit changes nothing else. Masks cover both footprints, grown by 6% of the shorter side.
Handles and targets keep 14% of a side from the border (:data:`POINT_MARGIN`), so every method
takes every sample at every working size down to 64 px.
``extras["ground_truth"]`` carries the truth for :mod:`dragexp.evaluation.ground_truth`.

Sample ``i`` depends only on ``(seed, i, size, edits)``: ``data=toybench data.seed=S
data.count=N`` gives the same samples on every machine.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .sample import DragSample, SampleSource, checked_count, checked_size, validate_sample
from .toyworld import (COLOURS, Scene, ToyObject, caption, random_background, random_object, render,
                       render_object)

__all__ = ["ToyBench", "EDITS"]

EDITS = ("translate", "stretch", "rotate")
_SHAPES_FOR = {"translate": ("disc", "box", "star", "ring"), "stretch": ("disc", "box"),
               "rotate": ("box", "star")}


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disc of ``radius`` pixels."""
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy > radius * radius:
                continue
            src = mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
            out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] |= src
    return out


class ToyBench(SampleSource):
    """Seeded toy-world drag samples with ground-truth edited images.

    Args:
        count: number of samples.
        seed: seed; sample ``i`` depends only on ``(seed, i, size, edits)``.
        size: ``(H, W)`` of the images (any size from 32 x 32; the toy model works at 128).
        edits: the edit kinds to cycle through (sample ``i`` gets ``edits[i % len(edits)]``).
        max_objects: scenes hold 1..``max_objects`` objects (the dragged one included).
        limit: at most this many of the ``count`` samples (``data.limit``).
        drop_mask: hand out every sample without its mask (:class:`SampleSource`).
    """

    def __init__(self, count: int = 20, seed: int = 0, size: tuple[int, int] = (128, 128),
                 edits: tuple[str, ...] | list[str] = ("translate",), max_objects: int = 3,
                 limit: int | None = None, drop_mask: bool = False):
        n = checked_count("ToyBench", "data.count", count, limit)
        h, w = checked_size("ToyBench", "data.size", size, 32)
        edits = tuple(str(e) for e in (edits if not isinstance(edits, str) else [edits]))
        bad = [e for e in edits if e not in EDITS]
        if not edits or bad:
            raise ValueError(f"ToyBench: data.edits={list(edits)!r}: each must be one of {EDITS}")
        if int(max_objects) < 1:
            raise ValueError(f"ToyBench: data.max_objects must be >= 1, got {max_objects!r}")
        self.count, self.seed, self.size, self.edits = n, int(seed), (h, w), edits
        self.max_objects, self.drop_mask = int(max_objects), bool(drop_mask)
        self.names = [f"{i:03d}_{edits[i % len(edits)]}" for i in range(n)]

    def _load(self, i: int) -> DragSample:
        kind = self.edits[i % len(self.edits)]
        h, w = self.size
        # Rejection sampling keeps the object in frame; it ends in a few tries, and the attempt
        # number is part of the seed, so the result stays a function of (seed, i).
        for attempt in range(1000):
            rng = np.random.default_rng([self.seed, 7919, i, attempt])
            made = self._try(rng, kind, h, w)
            if made is not None:
                break
        else:  # pragma: no cover - the ranges above always admit a layout
            raise RuntimeError(f"toybench sample {i}: no layout found")
        scene, edited, points, obj_before, obj_after = made
        source = render(scene, h, w)
        truth = render(edited, h, w)
        _, cov_before = render_object(obj_before, h, w)
        _, cov_after = render_object(obj_after, h, w)
        grow = max(1, int(round(0.06 * min(h, w))))
        mask = _grow((cov_before > 0) | (cov_after > 0), grow)
        return validate_sample(DragSample(
            name=self.names[i], image=source, points=points, mask=mask.astype(np.uint8),
            prompt=caption(scene), category=kind,
            extras={"ground_truth": {"image": truth, "object_alpha": cov_after.astype(np.float32),
                                     "edit": kind, "object": obj_after.shape,
                                     "colour": obj_after.colour}},
        ))

    def _try(self, rng: np.random.Generator, kind: str, h: int, w: int):
        s = min(h, w)
        n = int(rng.integers(1, self.max_objects + 1))
        colours = [str(c) for c in rng.choice(list(COLOURS), size=n + 2, replace=False)]
        shape = str(rng.choice(_SHAPES_FOR[kind]))
        obj = random_object(rng, colours[0], shape, size=(0.11, 0.17))
        if kind == "stretch":
            obj = replace(obj, angle=0.0)
        edited, handle, target = self._edit(rng, kind, obj, h, w)
        if edited is None:
            return None
        if not all(_clear_of_border(p, h, w) for p in (handle, target)):
            return None
        # The object and its edited self must stay well inside the frame.
        for o in (obj, edited):
            cx, cy = o.centre_px(h, w)
            reach = o.size * s * max(o.sx, o.sy) * 1.1
            if not (reach + 2 <= cx <= w - 1 - reach - 2 and reach + 2 <= cy <= h - 1 - reach - 2):
                return None
        others = []
        for c in colours[1:n]:
            for _ in range(50):
                other = random_object(rng, c, size=(0.08, 0.14))
                if all(_apart(other, o, h, w) for o in (obj, edited, *others)):
                    others.append(other)
                    break
        bg = random_background(rng, avoid={obj.colour, *(o.colour for o in others)})
        scene = Scene(objects=(*others, obj), **bg)
        return scene, replace(scene, objects=(*others, edited)), [handle, target], obj, edited

    @staticmethod
    def _edit(rng, kind: str, obj: ToyObject, h: int, w: int):
        s = min(h, w)
        if kind == "translate":
            dist = rng.uniform(0.12, 0.22) * s
            ang = rng.uniform(0, 2 * math.pi)
            dx, dy = dist * math.cos(ang), dist * math.sin(ang)
            # A handle somewhere on the object's body, not only its centre.
            u, v = rng.uniform(-0.4, 0.4, 2)
            handle = obj.point_px(u, v, h, w)
            edited = obj.moved(dx, dy, h, w)
            return edited, handle, (handle[0] + dx, handle[1] + dy)
        if kind == "stretch":
            axis = int(rng.integers(0, 2))
            side = float(rng.choice([-1.0, 1.0]))
            half = obj.size * s * (obj.sx if axis == 0 else obj.sy)
            amount = rng.uniform(0.5, 0.9) * half
            u, v = (side, 0.0) if axis == 0 else (0.0, side)
            handle = obj.point_px(u, v, h, w)
            shift = (side * amount / 2, 0.0) if axis == 0 else (0.0, side * amount / 2)
            grown = {"sx": obj.sx * (1 + amount / (2 * half))} if axis == 0 else \
                {"sy": obj.sy * (1 + amount / (2 * half))}
            edited = replace(obj.moved(*shift, h, w), **grown)
            target = (handle[0] + 2 * shift[0], handle[1] + 2 * shift[1])
            return edited, handle, target
        # rotate: a star's tip or a box's corner, carried along the circle about the centre
        delta = math.radians(rng.uniform(25, 50)) * float(rng.choice([-1.0, 1.0]))
        u, v = (0.0, -1.0) if obj.shape == "star" else (0.9, 0.72)
        edited = replace(obj, angle=obj.angle + delta)
        return edited, obj.point_px(u, v, h, w), edited.point_px(u, v, h, w)

    def __repr__(self) -> str:
        return (f"ToyBench(count={self.count}, seed={self.seed}, size={self.size}, "
                f"edits={list(self.edits)})")


# Points stay this fraction of a side away from the border. At the smallest working size every
# method accepts (64 px, an 8x8 latent), DragonDiffusion copies a 3x3 latent patch from handle
# to target, which needs both inside latent rows/columns 1..6, i.e. 1/8..7/8 of the image.
POINT_MARGIN = 0.14


def _clear_of_border(p, h: int, w: int) -> bool:
    x, y = p
    return POINT_MARGIN * w <= x <= (1 - POINT_MARGIN) * w and \
        POINT_MARGIN * h <= y <= (1 - POINT_MARGIN) * h


def _apart(a: ToyObject, b: ToyObject, h: int, w: int, margin: float = 4.0) -> bool:
    s = min(h, w)
    ax, ay = a.centre_px(h, w)
    bx, by = b.centre_px(h, w)
    ra = a.size * s * max(a.sx, a.sy)
    rb = b.size * s * max(b.sx, b.sy)
    return math.hypot(ax - bx, ay - by) > ra + rb + margin + 0.06 * s
