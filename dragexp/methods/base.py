"""The contract every editing method implements, and the steps they all share.

A method is a plain object built by Hydra from ``configs/method/<name>.yaml``. The experiment
loop, the editor and the benchmarks call it only through :class:`DragMethod`:

* ``name``: written with the results;
* ``edit_steps()``: how many DDIM steps its inversion and its denoising run (progress displays);
* ``edit(sample, models, ctx) -> EditResult``: one edit, everything the run needs besides the
  sample and the models travelling in one :class:`EditContext`.

Shared pre- and post-processing lives here once: the prompt (``prompt_override``), the image
as the VAE's input, and the decoded latent back as a uint8 image at the source size.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.stages import StageTimer
from ..performance.speed import SpeedSettings


@dataclass
class EditResult:
    """Everything one edit produced (images uint8 HxWx3 at the source size)."""

    image: np.ndarray
    handles_xy: list[tuple[float, float]]
    targets_xy: list[tuple[float, float]]
    trajectory_xy: list[list[list[float]]]   # [step][handle] = [x, y] image pixels
    losses: list[float]
    distances: list[float]
    num_steps: int
    stopped_early: bool
    timings: dict[str, float]
    lora_path: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EditContext:
    """How to run one edit, the same for every method.

    Attributes:
        callbacks: drag callbacks (tracking, stop, recorder, auto mask) from the ``callbacks``
            config group; methods without a point optimisation ignore them.
        lora_dir: where LoRAs are cached (methods that fine-tune one).
        lora_callbacks: extra Lightning callbacks of the LoRA fit (e.g. the editor's progress).
        precision: Lightning precision string (``32-true``, ``bf16-mixed``, ``16-mixed``).
        progress: show progress bars.
        speed: the fast path's switches (:mod:`dragexp.performance.speed`); faithful by default.
    """

    callbacks: tuple = ()
    lora_dir: str | Path | None = None
    lora_callbacks: tuple = ()
    precision: str = "32-true"
    progress: bool = True
    speed: SpeedSettings = field(default_factory=SpeedSettings)

    def __post_init__(self):
        object.__setattr__(self, "callbacks", tuple(self.callbacks or ()))
        object.__setattr__(self, "lora_callbacks", tuple(self.lora_callbacks or ()))
        if self.speed is None:
            object.__setattr__(self, "speed", SpeedSettings())


@runtime_checkable
class DragMethod(Protocol):
    """What the experiment loop, the editor and the benchmarks need of a method."""

    name: str

    def edit_steps(self) -> int:
        """DDIM steps of the inversion (and of the denoising that follows it)."""

    def edit(self, sample, models, ctx: EditContext) -> EditResult:
        """Edit one :class:`~dragexp.data.DragSample` with a :class:`~dragexp.models.ModelBundle`."""


def autocast_for(precision: str, device: torch.device):
    """Autocast for Lightning's mixed precisions on CUDA; a no-op context otherwise (fp32, CPU)."""
    if device.type == "cuda" and precision in ("16-mixed", "bf16-mixed"):
        return torch.autocast("cuda", dtype=torch.float16 if precision == "16-mixed"
                              else torch.bfloat16)
    return nullcontext()


def prompt_of(sample, prompt_override: str | None) -> str:
    """The prompt an edit uses: ``method.prompt_override`` when set, else the sample's."""
    return prompt_override if prompt_override is not None else sample.prompt


def image_tensor(image: np.ndarray, centred: bool = False) -> torch.Tensor:
    """A uint8 HxWx3 image as the VAE's (1, 3, H, W) input in [-1, 1].

    ``x / 127.5 - 1`` (DragDiffusion's and EasyDrag's arithmetic); ``centred=True`` computes
    ``(x / 255 - 0.5) * 2`` as DragonDiffusion's code does, which rounds differently in the
    last bit (the conformance cases see that bit).
    """
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    return (x / 255.0 - 0.5) * 2 if centred else x / 127.5 - 1.0


@torch.no_grad()
def working_size(image_hw: tuple[int, int], *, long_side: float | None = None,
                 area: float | None = None) -> tuple[int, int]:
    """The ``(H, W)`` a method works at: the image scaled so that its long side is
    ``long_side`` (EasyDrag: the authors' ``resize_image(img, 512)``) or its area is ``area``
    (DragonDiffusion: ``resize_numpy_image`` to ``max_resolution**2``), each side rounded half
    to even (numpy's, as both authors round) to a multiple of 64.

    Exactly one of ``long_side`` and ``area`` is given. A side that would round below 64 (an
    image too elongated for the size asked) is refused with the sizes in the message.
    """
    if (long_side is None) == (area is None):
        raise ValueError("working_size takes exactly one of long_side and area")
    h, w = float(image_hw[0]), float(image_hw[1])
    k = float(long_side) / max(h, w) if area is None else (float(area) / (h * w)) ** 0.5
    H, W = int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64
    if H < 64 or W < 64:
        asked = f"long side {long_side:g}" if area is None else f"area {area:g}"
        raise ValueError(f"a working size of {asked} px makes {H}x{W} of a {int(h)}x{int(w)} "
                         "image; both sides must be at least 64 (raise the method's resolution)")
    return H, W


def resize_image(image: np.ndarray, size_hw: tuple[int, int], resample=None) -> np.ndarray:
    """uint8 (H, W, 3) -> a new array of ``size_hw`` (Pillow).

    ``resample`` None: Lanczos when enlarging, box (area) when shrinking, the Pillow filters
    closest to the OpenCV Lanczos-4 / area pair the authors' EasyDrag code uses; otherwise that
    Pillow filter (DragonDiffusion: Lanczos for the upload, Pillow's default bicubic for the
    second image).
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    if tuple(image.shape[:2]) == (h, w):
        return image.copy()
    if resample is None:
        grow = h * w > image.shape[0] * image.shape[1]
        resample = Image.Resampling.LANCZOS if grow else Image.Resampling.BOX
    return np.asarray(Image.fromarray(image).resize((w, h), resample)).copy()


def decode_image(models, latent: torch.Tensor, size_hw: tuple[int, int]) -> np.ndarray:
    """Decodes ``latent`` (the first of the batch), resizes it bilinearly to ``size_hw`` (the
    source size) and returns it as uint8 HxWx3."""
    img = models.decode(latent.to(models.vae.dtype)).float()
    img = F.interpolate(img, size=tuple(size_hw), mode="bilinear", align_corners=False)
    return ((img[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()


def edit_result(image: np.ndarray, handles: torch.Tensor, targets: torch.Tensor,
                grid_hw: tuple[int, int], recorder, module, timer: StageTimer, *,
                lora_path=None, extras: dict | None = None) -> EditResult:
    """Assemble an :class:`EditResult`: points and trajectory mapped from the method's point
    grid ``grid_hw`` (row, col) to source-image pixels (x, y); ``image`` is at source size."""
    H, W = image.shape[:2]

    def to_xy(rc):
        return [[c / grid_hw[1] * W, r / grid_hw[0] * H] for r, c in rc]

    return EditResult(
        image=image, handles_xy=[tuple(p) for p in to_xy(handles.tolist())],
        targets_xy=[tuple(p) for p in to_xy(targets.tolist())],
        trajectory_xy=[to_xy(step) for step in (recorder.handles if recorder else [])],
        losses=list(recorder.losses) if recorder else [],
        distances=list(recorder.distances) if recorder else [],
        num_steps=module.num_steps, stopped_early=module.stopped_early,
        timings=_with_total(timer.seconds), lora_path=str(lora_path) if lora_path else None,
        extras=dict(extras or {}))


def fixed_points_result(sample, image: np.ndarray, timings: dict[str, float], *,
                        losses: list[float] | None = None, num_steps: int = 0,
                        extras: dict | None = None) -> EditResult:
    """An :class:`EditResult` of a method that moves no tracked points (its handles and
    targets are the sample's clicks, its trajectory empty)."""
    return EditResult(
        image=image, handles_xy=[tuple(p) for p in sample.handles],
        targets_xy=[tuple(p) for p in sample.targets], trajectory_xy=[],
        losses=list(losses or []), distances=[], num_steps=int(num_steps), stopped_early=False,
        timings=_with_total(timings), extras=dict(extras or {}))


def _with_total(seconds: dict[str, float]) -> dict[str, float]:
    """The stage seconds with their sum as ``total``."""
    return {**seconds, "total": sum(v for k, v in seconds.items() if k != "total")}
