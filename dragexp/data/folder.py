"""A user's own drag edits, one folder per sample.

Layout::

    root/
      <sample>/
        image.png            # or original_image.png, or the single *.png / *.jpg in the folder
        drag.yaml            # or drag.json
        mask.png             # optional; L mode, any value > 0 = editable

``drag.yaml`` (or ``drag.json``)::

    points: [[x, y], [x, y], ...]   # alternating handle, target; (x, y) = (column, row) pixels
    prompt: "a photo of a cat"      # optional
    mask: mask.png                  # optional file name (relative to the sample folder);
                                    # else mask.png if present; else no mask
    category: animals               # optional
    # any other key goes into DragSample.extras (a file name in the sample folder becomes
    # its absolute path, e.g. image2: second.png)

:func:`write_sample_folder` writes a :class:`DragSample` in this layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError

from .sample import DragSample, SampleError, SampleSource, checked_limit, validate_sample

__all__ = ["FolderSamples", "write_sample_folder"]

_IMAGE_NAMES = ("image.png", "original_image.png")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_DRAG_NAMES = ("drag.yaml", "drag.yml", "drag.json")
_KNOWN_KEYS = {"points", "prompt", "mask", "category"}


def _list_sample_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def load_image_file(path: Path, sample: str) -> np.ndarray:
    """Read an image as ``uint8`` RGB, applying its EXIF orientation; errors name the file."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB")).copy()
    except FileNotFoundError:
        raise SampleError(f"sample {sample!r}: image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SampleError(f"sample {sample!r}: cannot read image file {path}: {e}") from None


def load_mask_file(path: Path, sample: str) -> np.ndarray:
    """Read a mask image (converted to L); any value > 0 is editable. Errors name the file."""
    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                # a painted overlay: use opacity where the colour channels are empty
                rgba = np.asarray(im.convert("RGBA"))
                return ((rgba[..., :3].max(axis=2) > 0) & (rgba[..., 3] > 0)).astype(np.uint8)
            return (np.asarray(im.convert("L")) > 0).astype(np.uint8)
    except FileNotFoundError:
        raise SampleError(f"sample {sample!r}: mask file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SampleError(f"sample {sample!r}: cannot read mask file {path}: {e}") from None


class FolderSamples(SampleSource):
    """Drag samples from ``root/<sample>/`` folders (see the module docstring for the layout).

    Sample folders are listed (sorted, hidden and ``_``-prefixed folders skipped) when the
    source is built; each sample is read and validated only when it is indexed, so a broken
    sample raises :class:`SampleError` only when it is reached.

    Args:
        root: Folder holding one sub-folder per sample.
        names: Only these samples, in this order (each must exist under ``root``).
        limit: At most this many samples (after ``names``).
        drop_mask: Hand out every sample without its mask (:class:`SampleSource`).

    Raises:
        SampleError: ``root`` is missing or not a folder, or a name in ``names`` is not there.
    """

    def __init__(self, root: str | Path, names: list[str] | None = None, limit: int | None = None,
                 drop_mask: bool = False):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise SampleError(f"FolderSamples root {str(self.root)!r}: folder not found")
        available = _list_sample_dirs(self.root)
        if names is not None:
            if isinstance(names, str):
                names = [names]
            missing = [n for n in names if not (self.root / n).is_dir()]
            if missing:
                raise SampleError(
                    f"FolderSamples root {str(self.root)!r}: names: no sample folder for {missing}; "
                    f"available: {available[:20]}{' ...' if len(available) > 20 else ''}"
                )
            selected = list(dict.fromkeys(str(n) for n in names))
        else:
            selected = available
        if limit is not None:
            selected = selected[: checked_limit("FolderSamples", limit)]
        self.names = selected
        self.drop_mask = bool(drop_mask)

    def _load(self, i: int) -> DragSample:
        name = self.names[i]
        folder = self.root / name
        if not folder.is_dir():
            raise SampleError(f"sample {name!r}: folder not found: {folder}")
        cfg, drag_path = self._read_drag(folder, name)
        mask_name = cfg.get("mask")
        image_path = self._find_image(folder, name, mask_name)
        image = load_image_file(image_path, name)

        if mask_name is not None:
            if not isinstance(mask_name, str) or not mask_name:
                raise SampleError(f"sample {name!r}: mask: expected a file name in {drag_path}, got {mask_name!r}")
            mask_path = folder / mask_name
            if not mask_path.is_file():
                raise SampleError(f"sample {name!r}: mask file not found: {mask_path} (named in {drag_path})")
            mask = load_mask_file(mask_path, name)
        elif (folder / "mask.png").is_file():
            mask = load_mask_file(folder / "mask.png", name)
        else:
            mask = None

        points = cfg.get("points")
        if points is None:
            raise SampleError(f"sample {name!r}: points: missing in {drag_path}")
        prompt = cfg.get("prompt", "")
        extras = {k: _resolve_file(folder, v) for k, v in cfg.items() if k not in _KNOWN_KEYS}
        return validate_sample(DragSample(
            name=name, image=image, points=points, mask=mask,
            prompt="" if prompt is None else prompt, category=cfg.get("category", "") or "",
            extras=extras,
        ))

    @staticmethod
    def _read_drag(folder: Path, name: str) -> tuple[dict, Path]:
        found = [folder / n for n in _DRAG_NAMES if (folder / n).is_file()]
        if not found:
            raise SampleError(
                f"sample {name!r}: points file not found: {folder / 'drag.yaml'} (or drag.json)"
            )
        if len(found) > 1:
            raise SampleError(
                f"sample {name!r}: several points files {[str(p) for p in found]}; keep one"
            )
        path = found[0]
        try:
            text = path.read_text(encoding="utf-8")
            cfg = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SampleError(f"sample {name!r}: malformed file {path}: {e}") from None
        except OSError as e:
            raise SampleError(f"sample {name!r}: cannot read file {path}: {e}") from None
        if not isinstance(cfg, dict):
            raise SampleError(
                f"sample {name!r}: malformed file {path}: expected a mapping with 'points', "
                f"got {type(cfg).__name__}"
            )
        return cfg, path

    @staticmethod
    def _find_image(folder: Path, name: str, mask_name: Any) -> Path:
        for n in _IMAGE_NAMES:
            if (folder / n).is_file():
                return folder / n
        skip = {"mask.png", "user_drag.png"}
        if isinstance(mask_name, str):
            skip.add(Path(mask_name).name.lower())
        cands = sorted(
            p for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES and p.name.lower() not in skip
        )
        if len(cands) == 1:
            return cands[0]
        if not cands:
            raise SampleError(
                f"sample {name!r}: image file not found: {folder / 'image.png'} "
                "(or original_image.png, or a single *.png / *.jpg)"
            )
        raise SampleError(
            f"sample {name!r}: several candidate images {[p.name for p in cands]} in {folder}; "
            "name the source image.png"
        )

    def __repr__(self) -> str:
        return f"FolderSamples(root={str(self.root)!r}, {len(self)} samples)"


def _resolve_file(folder: Path, value: Any) -> Any:
    """An extra value naming a file in the sample folder (e.g. a second image for
    DragonDiffusion's appearance / paste tasks) becomes that file's absolute path."""
    if isinstance(value, str) and value and (folder / value).is_file():
        return str((folder / value).resolve())
    return value


def _plain(v: Any, name: str, key: str) -> Any:
    """Convert a value to YAML-safe plain types, or raise naming the key."""
    if isinstance(v, (str, bool)) or v is None:
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x, name, key) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x, name, key) for k, x in v.items()}
    raise SampleError(
        f"sample {name!r}: extras[{key!r}]: a {type(v).__name__} cannot be written to drag.yaml; "
        "only plain numbers, strings, lists and dicts can"
    )


def write_sample_folder(sample: DragSample, folder: str | Path) -> Path:
    """Write ``sample`` into ``folder`` (the sample's own folder, created if needed) in the
    :class:`FolderSamples` layout: ``image.png``, ``drag.yaml`` and, when a mask is drawn,
    ``mask.png`` (0/255). ``FolderSamples(folder.parent)`` reads it back under the name
    ``folder.name``.

    Extras must be plain values (numbers, strings, lists, dicts) to be written.

    Returns:
        The folder path.
    """
    s = validate_sample(sample)
    folder = Path(folder)
    extras = {k: _plain(v, s.name, k) for k, v in s.extras.items()}
    clash = sorted(set(extras) & _KNOWN_KEYS)
    if clash:
        raise SampleError(f"sample {s.name!r}: extras: keys {clash} clash with drag.yaml's own keys")
    folder.mkdir(parents=True, exist_ok=True)

    def num(v: float):
        return int(v) if float(v).is_integer() and math.isfinite(v) else float(v)

    cfg: dict[str, Any] = {"points": [[num(x), num(y)] for x, y in s.points], "prompt": s.prompt}
    Image.fromarray(s.image, "RGB").save(folder / "image.png")
    mask_path = folder / "mask.png"
    if s.has_mask:
        Image.fromarray(s.mask * 255, "L").save(mask_path)
        cfg["mask"] = "mask.png"
    elif mask_path.exists():
        mask_path.unlink()  # a stale mask would otherwise be picked up
    if s.category:
        cfg["category"] = s.category
    cfg.update(extras)
    for stale in ("drag.yml", "drag.json"):
        if (folder / stale).exists():
            (folder / stale).unlink()
    (folder / "drag.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return folder
