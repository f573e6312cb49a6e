"""Built-in samples carrying the inputs of DragonDiffusion's tasks (made in code, no files).

:class:`DragonSamples` takes :class:`~dragexp.data.procedural.ProceduralSamples` scenes and adds
what ``method=dragondiffusion method.task=...`` needs beyond points: an object mask for the
object tasks (a disc at the scene's object; ``drag`` keeps the scene's editable mask),
``extras['shift']`` (the first click pair; ``resize`` has ``extras['scale']`` instead), and a second image with its object
mask (``extras['image2']``, ``extras['mask2']``: another scene of the same size).
"""

from __future__ import annotations

import numpy as np

from .procedural import ProceduralSamples
from .sample import DragSample, SampleSource, validate_sample

__all__ = ["DragonSamples"]


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)


def _object_mask(s: DragSample) -> np.ndarray:
    """A disc standing for the scene's object: at the centroid of its mask (the shape and where
    it is dragged) or at the image centre, radius 0.2 of the shorter side."""
    h, w = s.size
    if s.has_mask:
        ys, xs = np.nonzero(s.mask)
        cx, cy = xs.mean(), ys.mean()
    else:
        cx, cy = (w - 1) / 2, (h - 1) / 2
    return _disc(h, w, cx, cy, 0.2 * min(h, w))


class DragonSamples(SampleSource):
    """Procedural scenes with DragonDiffusion task inputs in ``extras``.

    Args:
        n, size, seed, limit: as :class:`~dragexp.data.procedural.ProceduralSamples`.
        task: the task the samples are for; ``resize`` adds ``extras['scale'] = scale``.
        scale: the resize factor given to ``resize`` samples.
        drop_mask: hand out every sample without its mask (move / resize / appearance then
            refuse it: they need the object's mask).
    """

    def __init__(self, n: int = 2, size: tuple[int, int] = (128, 128), seed: int = 0,
                 task: str = "drag", scale: float = 1.2, limit: int | None = None,
                 drop_mask: bool = False):
        self.base = ProceduralSamples(n, size, seed, limit=limit)
        self.second = ProceduralSamples(n, size, seed + 1)
        self.task, self.scale = str(task), float(scale)
        self.names = list(self.base.names)
        self.drop_mask = bool(drop_mask)

    def _load(self, i: int) -> DragSample:
        s = self.base[i]
        other = self.second[(i + 1) % len(self.second)]
        (hx, hy), (tx, ty) = s.points[0], s.points[1]
        extras = dict(s.extras, image2=other.image, mask2=_object_mask(other),
                      prompt2=other.prompt)
        if self.task == "resize":
            extras["scale"] = self.scale        # resized in place
        else:
            extras["shift"] = [tx - hx, ty - hy]
        mask = s.mask if self.task == "drag" else _object_mask(s)
        return validate_sample(DragSample(name=s.name, image=s.image, points=s.points,
                                          mask=mask, prompt=s.prompt,
                                          category="dragon_" + self.task, extras=extras))

    def __repr__(self) -> str:
        return f"DragonSamples(n={len(self)}, size={self.base.size}, task={self.task!r})"
