"""DragBench (the DragDiffusion benchmark) in its published layout::

    root/<category>/<sample>/original_image.png
    root/<category>/<sample>/meta_data.pkl     # {"prompt": str, "points": [[x, y], ...],
                                               #  "mask": uint8 (H, W) array, 1 = editable}

``meta_data.pkl`` is a pickle, and unpickling can run arbitrary code, so it is read with
:class:`RestrictedUnpickler`, which admits only numpy array/dtype/scalar reconstruction and a
few builtin containers. The published files use exactly three globals:
``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype`` (pickle
protocol 4); the rest of the allow-list covers the same data re-saved with other pickle
protocols or numpy versions.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .folder import load_image_file
from .sample import DragSample, SampleError, SampleSource, validate_sample

__all__ = ["DragBenchSamples", "RestrictedUnpickler", "load_meta_data"]


def _np_attr(modules: tuple[str, ...], attr: str) -> Any:
    import importlib

    for m in modules:
        try:
            return getattr(importlib.import_module(m), attr)
        except (ImportError, AttributeError):
            continue
    return None


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object. Resolved here, never by importing what the pickle names."""
    reconstruct = _np_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
    scalar = _np_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "scalar")
    frombuffer = _np_attr(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
    import _codecs
    import collections

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # bytes in protocol 0-2 pickles
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        if reconstruct is not None:
            allowed[(mod, "_reconstruct")] = reconstruct
        if scalar is not None:
            allowed[(mod, "scalar")] = scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        if frombuffer is not None:
            allowed[(mod, "_frombuffer")] = frombuffer  # protocol 5 arrays
    for mod in ("builtins", "__builtin__"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("complex", complex),
                          ("bytearray", bytearray), ("list", list), ("tuple", tuple),
                          ("dict", dict), ("slice", slice)):
            allowed[(mod, name)] = obj
    return allowed


class _Refused(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.global_name = f"{module}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that admits only numpy array reconstruction and builtin containers.

    Any other global (``os.system``, ``builtins.eval``, a class, ...) is refused before it is
    resolved, so a malicious payload never runs.
    """

    ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def load_meta_data(path: str | Path, sample: str = "") -> Any:
    """Load a pickle with :class:`RestrictedUnpickler`.

    Raises:
        SampleError: naming the file (and the refused global, if that was the cause).
    """
    path = Path(path)
    who = f"sample {sample!r}: " if sample else ""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SampleError(f"{who}meta data file not found: {path}") from None
    except OSError as e:
        raise SampleError(f"{who}cannot read meta data file {path}: {e}") from None
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise SampleError(
            f"{who}meta data file {path}: refused pickle global {e.global_name!r}; only numpy "
            "array reconstruction and builtin containers are allowed (the file may be malicious)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure of a corrupt pickle
        raise SampleError(f"{who}meta data file {path}: cannot unpickle: {type(e).__name__}: {e}") from None


class DragBenchSamples(SampleSource):
    """DragBench samples, read lazily in sorted (category, sample) order.

    Names are ``"<category>/<sample>"``.

    Args:
        root: The DragBench folder (holding the category folders).
        categories: Only these categories (each must exist); default all, sorted.
        limit: At most this many samples in total.
        per_category: At most this many samples from each category (applied before ``limit``).
        drop_mask: Hand out every sample without its mask (:class:`SampleSource`; the "w/o
            mask" rows of the papers).

    Raises:
        SampleError: ``root`` is missing, or a requested category is not there.
    """

    def __init__(self, root: str | Path, categories: list[str] | None = None,
                 limit: int | None = None, per_category: int | None = None,
                 drop_mask: bool = False):
        self.root = Path(root).expanduser()
        self.drop_mask = bool(drop_mask)
        if not self.root.is_dir():
            raise SampleError(f"DragBench root {str(self.root)!r}: folder not found")
        available = sorted(p.name for p in self.root.iterdir()
                           if p.is_dir() and not p.name.startswith((".", "_")))
        if categories is None:
            cats = available
        else:
            if isinstance(categories, str):
                categories = [categories]
            missing = [c for c in categories if c not in available]
            if missing:
                raise SampleError(
                    f"DragBench root {str(self.root)!r}: categories: {missing} not found; "
                    f"available: {available}"
                )
            cats = sorted(set(categories))
        for name, v in (("limit", limit), ("per_category", per_category)):
            if v is not None and int(v) < 0:
                raise ValueError(f"DragBenchSamples: {name} must be >= 0, got {v!r}")
        names: list[str] = []
        for c in cats:
            samples = sorted(p.name for p in (self.root / c).iterdir()
                             if p.is_dir() and not p.name.startswith((".", "_")))
            if per_category is not None:
                samples = samples[: int(per_category)]
            names += [f"{c}/{s}" for s in samples]
        if limit is not None:
            names = names[: int(limit)]
        self.categories = cats
        self.names = names

    def _load(self, i: int) -> DragSample:
        name = self.names[i]
        category = name.split("/", 1)[0]
        folder = self.root / name
        image_path = folder / "original_image.png"
        meta_path = folder / "meta_data.pkl"
        if not image_path.is_file():
            raise SampleError(f"sample {name!r}: image file not found: {image_path}")
        if not meta_path.is_file():
            raise SampleError(f"sample {name!r}: meta data file not found: {meta_path}")
        meta = load_meta_data(meta_path, name)
        if not isinstance(meta, dict):
            raise SampleError(
                f"sample {name!r}: meta data file {meta_path}: expected a dict, got {type(meta).__name__}"
            )
        if "points" not in meta:
            raise SampleError(f"sample {name!r}: points: missing in {meta_path}")
        image = load_image_file(image_path, name)
        mask = meta.get("mask")
        if mask is not None and not isinstance(mask, np.ndarray):
            mask = np.asarray(mask)
        extras = {k: v for k, v in meta.items() if k not in ("prompt", "points", "mask")}
        return validate_sample(DragSample(
            name=name, image=image, points=meta["points"], mask=mask,
            prompt=meta.get("prompt") or "", category=category, extras=extras,
        ))

    def __repr__(self) -> str:
        return f"DragBenchSamples(root={str(self.root)!r}, {len(self)} samples)"
