"""The one input type every method consumes: :class:`DragSample`, and its validation.

Conventions (see the spec's "Shared conventions"):

- ``points`` are clicks ``(x, y) = (column, row)`` in image pixels, alternating handle, target,
  handle, target, ... (the DragBench order).
- ``mask`` is ``uint8`` ``(H, W)`` with 1 = editable. An all-zero mask means "no mask drawn";
  each method decides what that means for it.

Sources of samples (:mod:`dragexp.data.procedural`, :mod:`~dragexp.data.folder`,
:mod:`~dragexp.data.dragbench`) load lazily: indexing a source loads and validates that one
sample, so one bad sample raises :class:`SampleError` only when it is reached, and a runner can
record the error and go on (see :meth:`SampleSource.iter_checked`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SampleError", "DragSample", "validate_sample", "SampleSource"]

Point = tuple[float, float]


class SampleError(ValueError):
    """Bad input for a drag sample.

    The message always names the sample (or, before a sample exists, the root folder) and the
    parameter or file at fault, e.g. ``sample 'cat_01': points: 3 given, ...``.
    """


def _err(name: Any, what: str, msg: str) -> SampleError:
    return SampleError(f"sample {name!r}: {what}: {msg}")


@dataclass
class DragSample:
    """One drag edit: an image, its clicked handle/target pairs, an optional mask and prompt.

    Attributes:
        name: Unique, filesystem-safe id, e.g. ``"circle_right"`` or
            ``"animals/JH_2023-09-14-1820-16"`` (``/`` separates a category).
        image: ``uint8`` ``(H, W, 3)`` RGB.
        points: Clicks ``(x, y) = (column, row)`` in image pixels, alternating handle, target.
        mask: ``uint8`` ``(H, W)``, 1 = editable; all zeros = "no mask drawn".
        prompt: Text prompt ("" if none).
        category: Benchmark category ("" if none).
        extras: Method-specific inputs (a second image, a shift, a scale, ...).
    """

    name: str
    image: np.ndarray
    points: list[Point]
    mask: np.ndarray
    prompt: str = ""
    category: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def handles(self) -> list[Point]:
        """Handle points ``(x, y)``: the even entries of :attr:`points`."""
        return [tuple(p) for p in self.points[0::2]]

    @property
    def targets(self) -> list[Point]:
        """Target points ``(x, y)``: the odd entries of :attr:`points`."""
        return [tuple(p) for p in self.points[1::2]]

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the image."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def has_mask(self) -> bool:
        """Whether a mask was drawn (any editable pixel)."""
        return bool(np.any(self.mask))

    def __repr__(self) -> str:  # arrays would flood logs
        h, w = self.image.shape[:2] if getattr(self.image, "ndim", 0) >= 2 else ("?", "?")
        return (
            f"DragSample(name={self.name!r}, size=({h}, {w}), pairs={len(self.points) // 2}, "
            f"mask={'yes' if self.mask is not None and np.any(self.mask) else 'no'}, "
            f"prompt={self.prompt!r}, category={self.category!r}, extras={sorted(self.extras)})"
        )


_BAD_NAME_CHARS = set('\\:*?"<>|\0\n\r\t')


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise _err(name, "name", "must be a non-empty string")
    bad = sorted(set(name) & _BAD_NAME_CHARS)
    if bad:
        raise _err(name, "name", f"contains characters that are not filesystem-safe: {bad}")
    if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        raise _err(
            name, "name", "must be a relative path of non-empty parts ('/' separates a category) "
            "without '.' or '..'"
        )
    return name


def rgb(image: np.ndarray) -> np.ndarray:
    """The (H, W, 3) RGB form of an image array: (H, W) and (H, W, 1) gray are repeated to three
    channels, (H, W, 4) RGBA loses its alpha; any other shape is a ValueError."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"shape {tuple(image.shape)}, expected (H, W, 3) RGB "
                         "((H, W) gray and (H, W, 4) RGBA are converted)")
    return image


def _check_image(name: str, image: Any) -> np.ndarray:
    if image is not None and not isinstance(image, np.ndarray) and hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))  # a PIL image
    if not isinstance(image, np.ndarray):
        raise _err(name, "image", f"expected a numpy uint8 (H, W, 3) array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise _err(
            name, "image", f"dtype {image.dtype}, expected uint8 with values 0..255 "
            "(convert e.g. with (img * 255).round().clip(0, 255).astype(np.uint8))"
        )
    try:
        image = rgb(image)
    except ValueError as e:
        raise _err(name, "image", str(e)) from None
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise _err(name, "image", f"empty image of shape {tuple(image.shape)}")
    return np.ascontiguousarray(image).copy()


def _check_points(name: str, points: Any, h: int, w: int) -> list[Point]:
    if points is None:
        raise _err(name, "points", "0 given, handle/target pairs need an even, non-zero number")
    if isinstance(points, np.ndarray):
        points = points.tolist()
    if isinstance(points, (str, bytes)) or not isinstance(points, Sequence):
        raise _err(name, "points", f"expected a list of (x, y) pairs, got {type(points).__name__}")
    out: list[Point] = []
    for i, p in enumerate(points):
        if isinstance(p, np.ndarray):
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 2:
            raise _err(name, "points", f"point {i} is {p!r}, expected (x, y)")
        try:
            x, y = float(p[0]), float(p[1])
        except (TypeError, ValueError):
            raise _err(name, "points", f"point {i} is {p!r}, expected two numbers (x, y)") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise _err(name, "points", f"point {i} is ({x}, {y}), coordinates must be finite")
        out.append((x, y))
    n = len(out)
    if n == 0 or n % 2:
        raise _err(name, "points", f"{n} given, handle/target pairs need an even, non-zero number")
    for i, (x, y) in enumerate(out):
        if not (0.0 <= x <= w - 1 and 0.0 <= y <= h - 1):
            role = "handle" if i % 2 == 0 else "target"
            raise _err(
                name, "points", f"point {i} ({role} of pair {i // 2}) at (x={x:g}, y={y:g}) is outside "
                f"the image of size (H={h}, W={w}); x must be in [0, {w - 1}], y in [0, {h - 1}]"
            )
    return out


def _check_mask(name: str, mask: Any, h: int, w: int) -> np.ndarray:
    if mask is None:
        return np.zeros((h, w), np.uint8)
    if not isinstance(mask, np.ndarray) and hasattr(mask, "convert"):
        mask = np.asarray(mask.convert("L"))  # a PIL image
    if not isinstance(mask, np.ndarray):
        raise _err(name, "mask", f"expected a numpy (H, W) array or None, got {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise _err(name, "mask", f"shape {tuple(mask.shape)}, expected (H, W) = ({h}, {w})")
    if mask.shape != (h, w):
        raise _err(
            name, "mask", f"size (H={mask.shape[0]}, W={mask.shape[1]}) differs from the image size "
            f"(H={h}, W={w})"
        )
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise _err(name, "mask", f"dtype {mask.dtype} is not numeric")
    if np.issubdtype(mask.dtype, np.floating) and not np.all(np.isfinite(mask)):
        raise _err(name, "mask", "contains NaN or infinite values")
    return (mask > 0).astype(np.uint8)


def validate_sample(s: DragSample) -> DragSample:
    """Check a sample and return a normalised copy (the input is not modified).

    Normalisation:
        - image: a PIL image is converted to RGB; ``(H, W)`` gray and ``(H, W, 1)`` become RGB by
          repeating the channel; ``(H, W, 4)`` RGBA drops its alpha channel (no compositing).
          Any other shape, or a dtype other than ``uint8``, is an error.
        - points: ``(x, y)`` pairs (lists, tuples or an ``(N, 2)`` array) become a list of float
          tuples. Float coordinates are fine; each must lie in ``x in [0, W-1]``,
          ``y in [0, H-1]``. The count must be even and non-zero.
        - mask: ``None`` becomes all zeros ("no mask drawn"); bool, 0/1, 0/255 and float masks
          become ``uint8`` 0/1 with any value > 0 editable; ``(H, W, 1)`` is squeezed.
        - Image sides need not be multiples of 8.

    Raises:
        SampleError: naming the sample and the parameter at fault.
    """
    if not isinstance(s, DragSample):
        raise SampleError(f"sample {getattr(s, 'name', '?')!r}: expected a DragSample, got {type(s).__name__}")
    name = _check_name(s.name)
    image = _check_image(name, s.image)
    h, w = image.shape[:2]
    points = _check_points(name, s.points, h, w)
    mask = _check_mask(name, s.mask, h, w)
    prompt = "" if s.prompt is None else s.prompt
    if not isinstance(prompt, str):
        raise _err(name, "prompt", f"expected a string, got {type(prompt).__name__}")
    category = "" if s.category is None else s.category
    if not isinstance(category, str):
        raise _err(name, "category", f"expected a string, got {type(category).__name__}")
    extras = {} if s.extras is None else s.extras
    if not isinstance(extras, dict):
        raise _err(name, "extras", f"expected a dict, got {type(extras).__name__}")
    return DragSample(
        name=name, image=image, points=points, mask=mask, prompt=prompt, category=category,
        extras=dict(extras),
    )


def checked_count(owner: str, key: str, count, limit=None) -> int:
    """How many samples a generated source hands out: ``count``, at most ``limit``.

    ``owner`` and ``key`` name the source and the parameter in the error (e.g. ``ToyBench``,
    ``data.count``); ``limit`` is ``data.limit`` (None: no limit).
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"{owner}: {key} must be an integer >= 0, got {count!r}")
    return int(count) if limit is None else min(int(count), checked_limit(owner, limit))


def checked_limit(owner: str, limit) -> int:
    """``data.limit`` as an int, refused when negative."""
    if int(limit) < 0:
        raise ValueError(f"{owner}: limit must be >= 0, got {limit!r}")
    return int(limit)


def checked_size(owner: str, key: str, size, minimum: int) -> tuple[int, int]:
    """An image size ``(H, W)`` of at least ``minimum`` on each side."""
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {key} must be (H, W), got {size!r}") from None
    if h < minimum or w < minimum:
        raise ValueError(f"{owner}: {key} must be at least ({minimum}, {minimum}), got {size!r}")
    return h, w


class SampleSource(Sequence):
    """Base of the lazy sample collections: ``len``, indexing (loads and validates one sample),
    iteration, :attr:`names` (known without loading) and :meth:`iter_checked`.

    Subclasses implement :attr:`names` and :meth:`_load`. A source whose :attr:`drop_mask` is
    true hands out every sample with an all-zero mask ("no mask drawn"), whatever its files
    say: the "without mask" rows of the papers (e.g. EasyDrag Table 1, "DragDiffusion w/o
    mask"), where each method then does what it does without a mask.
    """

    names: list[str]
    drop_mask: bool = False

    def _load(self, index: int) -> DragSample:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        try:
            i = int(index)
        except TypeError:
            raise TypeError(f"{type(self).__name__} indices must be integers or slices") from None
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {n} samples")
        sample = self._load(i)
        if self.drop_mask:
            sample.mask = np.zeros_like(sample.mask)
        return sample

    def __iter__(self) -> Iterator[DragSample]:
        for i in range(len(self)):
            yield self[i]

    def iter_checked(self) -> Iterator[tuple[str, DragSample | None, SampleError | None]]:
        """Yield ``(name, sample, None)`` or ``(name, None, error)`` for every sample, so a
        runner can record a bad sample and continue (plain iteration stops at the first error)."""
        for i, name in enumerate(self.names):
            try:
                yield name, self[i], None
            except SampleError as e:
                yield name, None, e

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples)"
