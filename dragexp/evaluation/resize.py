"""Image preparation shared by every DragBench metric (docs/evaluation.md section 1).

Step 0 of both reference scripts: the edited ("dragged") image is brought to the source
image's size with ``PIL.Image.resize(source.size, BILINEAR)`` before anything else. PIL's
bilinear filter is antialiased when shrinking and works in 8-bit fixed point, so the result is
a uint8 image that only PIL reproduces exactly; this module therefore goes through PIL.
Everything after it happens at the source image's own (often odd) resolution.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["resize_to_source", "to_signed_unit", "load_rgb"]


def load_rgb(path) -> np.ndarray:
    """An image file as ``uint8 (H, W, 3)`` RGB (the reference assumes RGB PNGs)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def resize_to_source(edited: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """The edited image at the source size, as both reference scripts compute it.

    docs/evaluation.md section 1, the first step of both scripts:
    ``dragged_PIL.resize(source_PIL.size, PIL.Image.BILINEAR)``. No point is rescaled anywhere,
    so a method that returns 512 x 512 for a non-square source is scored after an
    aspect-changing resize (a quirk of the protocol, reproduced on purpose).

    Args:
        edited: ``uint8 (h, w, 3)`` edited image, any size.
        size_hw: ``(H, W)`` of the source image.

    Returns:
        ``uint8 (H, W, 3)``; the input itself when it already has that size (PIL returns an
        identical copy then).
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    if edited.shape[:2] == (h, w):
        return edited
    return np.asarray(Image.fromarray(edited).resize((w, h), Image.BILINEAR)).copy()


def to_signed_unit(image: np.ndarray) -> torch.Tensor:
    """``uint8 (H, W, 3)`` -> float32 ``(1, 3, H, W)`` in [-1, 1]: ``(x / 255.0 - 0.5) * 2``.

    docs/evaluation.md section 2, step 2 (the DIFT input). The similarity script's
    ``x / 127.5 - 1`` gives the same float32 values for all 256 inputs (checked in the tests).
    """
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return ((x / 255.0 - 0.5) * 2)[None]
