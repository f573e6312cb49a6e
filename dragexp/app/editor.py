"""The editor behind the browser UI: configuration, one edit, saving a sample. No Gradio here.

Everything an edit needs comes from the same Hydra config as ``scripts/train.py``
(``configs/train.yaml`` composed with the command-line overrides, plus the method and parameters
picked in the UI) and goes through the same helpers of :mod:`dragexp.experiment` and the same
``method.edit`` call as a training job; results are written by :func:`dragexp.reporting.results.write_result`.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from ..data import DragSample, ToyBench, validate_sample
from ..experiment import build_drag_callbacks, load_models, pick_device, resolve_precision
from ..methods.base import EditContext
from ..performance.speed import SpeedSettings, apply_to_models
from ..reporting.results import staging_dir, write_result
from .progress import EditProgress

__all__ = ["CONFIG_DIR", "PARAMS", "Editor", "EditOutcome", "InputError", "check_page_overrides",
           "check_points", "fit_image", "write_dragbench_sample"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# The main parameters the UI shows: method config key -> label.
PARAMS = {
    "lr": "learning rate",
    "n_pix_step": "optimisation steps",
    "lora_steps": "LoRA steps",
    "inversion_strength": "inversion strength",
}
_HYDRA_LOCK = threading.Lock()
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class InputError(ValueError):
    """Input the UI should explain to the user (no image, no points, a bad name, ...)."""


def check_points(points: Sequence, image_present: bool = True) -> None:
    """Raise :class:`InputError` with a message for the user unless clicks form pairs."""
    if not image_present:
        raise InputError("No image: upload an image or pick a built-in sample first.")
    n = len(points or [])
    if n == 0:
        raise InputError("No points: click a handle point on the image, then its target.")
    if n % 2:
        raise InputError(f"{n} click{'s' if n > 1 else ''}: point {n} is a handle without a "
                         "target. Click its target, or undo the last point.")


def check_page_overrides(overrides: Sequence[str]) -> None:
    """Overrides typed in the page may only set method values: ``method.<key>=<value>`` with no
    ``_target_``-like keys and no ``${...}`` interpolations (anyone who can open the page could
    otherwise make Hydra instantiate arbitrary classes); everything else is for the command line."""
    for o in overrides:
        key, sep, value = str(o).partition("=")
        parts = key.split(".")
        if (not sep or parts[0] != "method" or len(parts) < 2 or
                any(not p or p.startswith("_") for p in parts[1:]) or "${" in value):
            raise InputError(f"More overrides: {o!r}: only method.<key>=<value> values can be set "
                             "in the page (e.g. method.lam=0.2); other overrides go on the "
                             "command line of scripts/app.py.")


def fit_image(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """RGB uint8 copy of an uploaded image, scaled down (never up) to ``max_side`` if larger."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    h, w = img.shape[:2]
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.LANCZOS))
    return np.ascontiguousarray(img)


def write_dragbench_sample(root: str | Path, category: str, name: str, image: np.ndarray,
                           points: Sequence, mask: np.ndarray | None, prompt: str) -> Path:
    """Write ``root/<category>/<name>/original_image.png`` and ``meta_data.pkl`` as DragBench does.

    ``meta_data.pkl`` is a pickle of ``{"prompt": str, "points": [[x, y], ...], "mask": uint8
    (H, W) array, 1 = editable}``; points alternate handle, target in image pixels (integers
    where the clicks were). The folder is written under a temporary name and renamed; an
    existing sample is never overwritten.

    Raises:
        InputError: a bad category or name, or the sample exists.
        SampleError: the image, points or mask do not form a valid sample.
    """
    for what, v in (("category", category), ("name", name)):
        if not isinstance(v, str) or not _SAFE.match(v):
            raise InputError(f"Sample {what} {v!r}: use letters, digits, '.', '_' or '-' "
                             "(starting with a letter or digit).")
    sample = validate_sample(DragSample(name=f"{category}/{name}", image=image,
                                        points=list(points or []), mask=mask, prompt=prompt or ""))
    final = Path(root).expanduser() / category / name
    if final.exists():
        raise InputError(f"Sample {category}/{name} already exists in {final.parent}; "
                         "choose another name.")
    final.parent.mkdir(parents=True, exist_ok=True)
    pts = [[int(v) if float(v).is_integer() else float(v) for v in p] for p in sample.points]
    meta = {"prompt": sample.prompt, "points": pts, "mask": sample.mask.astype(np.uint8)}
    tmp = staging_dir(final)
    try:
        Image.fromarray(sample.image).save(tmp / "original_image.png")
        with open(tmp / "meta_data.pkl", "wb") as f:
            pickle.dump(meta, f, protocol=4)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@dataclass
class EditOutcome:
    """One finished edit: the sample that was run, the method's :class:`EditResult`, where
    :func:`write_result` put its files, and the wall-clock seconds of ``method.edit``."""

    sample: DragSample
    result: object
    folder: Path
    seconds: float
    method: str
    progress_events: list


class Editor:
    """Holds the configuration and the models; runs edits one at a time.

    Args:
        overrides: Hydra overrides of ``configs/train.yaml``, as for ``scripts/train.py``.
        out_dir: where edits are written (``<out_dir>/<edit name>/``, the layout of a run's
            ``results/``); default ``<paths.root>/outputs/app/<date>``.
        samples_dir: default folder for "save as sample"; default ``<paths.root>/outputs/app_samples``.
        config_dir: the Hydra config folder.
    """

    def __init__(self, overrides: Sequence[str] = (), out_dir: str | Path | None = None,
                 samples_dir: str | Path | None = None, config_dir: str | Path = CONFIG_DIR):
        self.config_dir = Path(config_dir).resolve()
        self.overrides = [str(o) for o in overrides]
        cfg = self.compose()
        self.method_names = sorted(p.stem for p in (self.config_dir / "method").glob("*.yaml"))
        self.default_method = str(cfg.hydra.runtime.choices.get("method") or self.method_names[0])
        root = Path(cfg.paths.root)
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        self.out_dir = Path(out_dir) if out_dir else root / "outputs" / "app" / stamp
        self.samples_dir = Path(samples_dir) if samples_dir else root / "outputs" / "app_samples"
        self.device = pick_device(cfg.trainer.get("device", "auto"))
        self.speed = SpeedSettings.from_config(cfg.get("speed"))
        self.precision, self.dtype = resolve_precision(self.speed.precision or cfg.trainer.precision,
                                                       self.device)
        self.cfg = cfg
        self._lock = threading.Lock()
        # edits are numbered on from those already in out_dir (an earlier session's)
        done = [int(m.group(1)) for f in self.out_dir.glob("edit_*")
                if (m := re.fullmatch(r"edit_(\d+)", f.name))]
        self._count = max(done, default=0)

    # -- configuration -------------------------------------------------------------------
    def compose(self, method: str | None = None, params: dict | None = None,
                more: Sequence[str] = ()) -> DictConfig:
        """``configs/train.yaml`` with the command-line overrides, then ``method=<method>``,
        ``method.<key>=<value>`` for the UI's parameters (they win over the command line) and
        ``more`` overrides typed in the UI."""
        ours = {f"method.{k}" for k in (params or {})}
        base = [o for o in self.overrides
                if not (method and _key(o) == "method") and _key(o) not in ours]
        extra = [f"method={method}"] if method else []
        if method:
            # command-line method.* values the picked method does not have are left out
            # (method.lora_steps=... and then EasyDrag, which has no LoRA)
            plain = self._compose([o for o in base if not _key(o).startswith("method.")] + extra)
            keys = set(plain.method.keys())
            base = [o for o in base
                    if not _key(o).startswith("method.") or _key(o).split(".")[1] in keys]
        extra += [f"method.{k}={_value(v)}" for k, v in (params or {}).items()]
        return self._compose(base + extra + [str(o) for o in more])

    def _compose(self, overrides: list[str]) -> DictConfig:
        with _HYDRA_LOCK:
            with initialize_config_dir(config_dir=str(self.config_dir), version_base="1.3",
                                       job_name="app"):
                cfg = compose("train", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)   # resolves ${hydra:runtime.cwd}
        return cfg

    def method_params(self, method: str) -> dict:
        """The UI parameters the method's config has, with their values (others absent)."""
        m = self.compose(method).method
        return {k: m[k] for k in PARAMS if k in m}

    @property
    def models(self):
        """The model bundle, built once per process by :func:`dragexp.experiment.load_models`."""
        return load_models(self.cfg.model, self.device, self.dtype)

    @property
    def resolution(self) -> int:
        return int(self.models.resolution)

    def builtin_samples(self) -> ToyBench:
        """Built-in toybench samples (one of each edit kind, and more) at the model's resolution:
        scenes of the world the default toy model was trained on."""
        r = self.resolution
        return ToyBench(count=6, size=(r, r), seed=int(self.cfg.seed),
                        edits=("translate", "stretch", "rotate"))

    # -- one edit ------------------------------------------------------------------------
    def run(self, image: np.ndarray | None, points: Sequence, mask: np.ndarray | None,
            prompt: str = "", method: str | None = None, params: dict | None = None,
            report: Callable[[float, str], None] | None = None,
            name: str | None = None, overrides: Sequence[str] = ()) -> EditOutcome:
        """Edit an image as a training job edits a sample, and write its result files.

        Raises:
            InputError: no image, no points, an odd number of clicks, overrides Hydra refuses.
            SampleError, BorderError, ValueError: what the method or the sample check raise.
        """
        check_points(points, image is not None)
        check_page_overrides(overrides)
        method = method or self.default_method
        try:
            cfg = self.compose(method, params, overrides)
        except Exception as exc:  # Hydra's override and composition errors
            raise InputError(f"Config: {type(exc).__name__}: {exc}") from None
        with self._lock:
            self._count += 1
            name = name or f"edit_{self._count:03d}"
            sample = validate_sample(DragSample(name=name, image=image, points=list(points),
                                                mask=mask, prompt=prompt or "", category="app"))
            models = apply_to_models(load_models(cfg.model, self.device, self.dtype), self.speed)
            m = instantiate(cfg.method)
            n_edit = m.edit_steps()
            tracker = EditProgress(report or (lambda f, t: None), dict(
                lora=int(cfg.method.get("lora_steps", 0) or 0), inversion=n_edit,
                optimisation=int(cfg.method.get("n_pix_step", 0) or 0), denoising=n_edit))
            callbacks = build_drag_callbacks(cfg) + [tracker.drag_callback()]
            ctx = EditContext(callbacks, lora_dir=Path(cfg.paths.lora_cache),
                              lora_callbacks=[tracker.lora_callback()], precision=self.precision,
                              progress=bool(cfg.progress), speed=self.speed)
            torch.manual_seed(int(cfg.seed))
            t0 = time.perf_counter()
            with tracker.watch(models.unet):
                result = m.edit(sample, models, ctx)
            seconds = time.perf_counter() - t0
            folder = write_result(self.out_dir, sample, result,
                                  extra=dict(method=m.name, model=models.source, app=True))
        return EditOutcome(sample, result, folder, seconds, m.name, tracker.events)

    def save_sample(self, image, points, mask, prompt: str, category: str, name: str,
                    root: str | Path | None = None) -> Path:
        """Save the current image, clicks, mask and prompt as a DragBench-layout sample."""
        check_points(points, image is not None)
        return write_dragbench_sample(root or self.samples_dir, category, name, image, points,
                                      mask, prompt)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~") if "=" in override else override.lstrip("+~")


def _value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return repr(v)
    return str(v)
