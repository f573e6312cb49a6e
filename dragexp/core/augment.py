"""Training views for DragDiffusion's identity-preserving LoRA (docs/methods.md, DragDiffusion 1).

Each LoRA step sees ``batch_size`` augmented views of the one input image. The reference builds
them with torchvision on the PIL image: ``Resize(size, BILINEAR)`` (shorter side to ``size``),
``RandomCrop(size)``, ``ToTensor``, ``Normalize(0.5, 0.5)``, then casts the batch to float16
(docs/methods.md, DragDiffusion 1, "Augmentation"). This module does the same with
Pillow and torch directly, and takes the crop draws from an injectable ``randint`` so that a
recorded draw sequence can be replayed.

torchvision details mirrored here (``torchvision/transforms/functional.py::resize`` and
``transforms.py::RandomCrop.get_params``):

- the output size is ``(size, int(size * long / short))`` (truncated), and when it equals the
  input size the image is returned untouched (no resampling at all);
- ``RandomCrop`` returns ``(0, 0)`` *without drawing* when the image already has the crop size;
  otherwise it draws ``top = randint(0, h - size + 1)`` and then
  ``left = randint(0, w - size + 1)``, both, even when one of the ranges is 1.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

RandInt = Callable[[int], int]


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``size`` (longer side truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size``, like ``torchvision.transforms.Resize(size)``.

    The longer side becomes ``int(size * long / short)``; Pillow's bilinear filter (which
    antialiases when downscaling) does the resampling. An image that already has that size is
    returned as is.

    Args:
        image: PIL image.
        size: target length of the shorter side.

    Returns:
        The resized PIL image (``image`` itself when nothing changes).
    """
    h, w = resized_shape(image.height, image.width, size)
    if (h, w) == (image.height, image.width):
        return image
    return image.resize((w, h), Image.BILINEAR)


def torch_randint(generator: torch.Generator | None = None) -> RandInt:
    """A ``randint(high)`` drawing ``torch.randint(0, high, (1,))`` from ``generator``."""

    def randint(high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=generator).item())

    return randint


def crop_offsets(height: int, width: int, size: int, randint: RandInt) -> tuple[int, int]:
    """(top, left) of one random ``size`` x ``size`` crop, drawn like ``RandomCrop.get_params``."""
    if height < size or width < size:
        raise ValueError(f"crop {size} larger than the image {height}x{width}")
    if height == size and width == size:
        return 0, 0  # torchvision returns without drawing
    top = randint(height - size + 1)
    left = randint(width - size + 1)
    return top, left


def to_model_range(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW in [-1, 1]: ``ToTensor`` then ``Normalize(0.5, 0.5)``."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return (x - 0.5) / 0.5


def lora_views(image: np.ndarray, n_views: int, size: int,
               randint: RandInt | None = None) -> torch.Tensor:
    """``n_views`` augmented views of ``image``: the batch train_lora hands to the VAE.

    Args:
        image: uint8 RGB array ``(H, W, 3)``.
        n_views: number of views (the LoRA batch size).
        size: resize/crop size (the model resolution, 512 for SD 1.5).
        randint: ``randint(high) -> int`` in ``[0, high)``; called twice per view (top, then
            left) unless the resized image is exactly ``size`` x ``size``. Defaults to
            ``torch.randint`` on the global generator.

    Returns:
        float16 tensor ``(n_views, 3, size, size)`` in [-1, 1] (normalised in float32, then cast).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    randint = randint if randint is not None else torch_randint()
    resized = np.asarray(resize_shorter(Image.fromarray(image), size))
    h, w = resized.shape[:2]
    views = []
    for _ in range(n_views):
        top, left = crop_offsets(h, w, size, randint)
        views.append(to_model_range(resized[top:top + size, left:left + size]))
    return torch.stack(views).to(torch.float16)
