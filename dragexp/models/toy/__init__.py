"""The trained toy model (``model=toy``): its diffusers folder lives in ``weights/`` beside this
file, made by ``scripts/train_toy_model.py`` (model card: ``weights/README.md``)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"


def load_toy(path: str | None = None, resolution: int | None = None):
    """The toy model through the same loader as a local SD-1.5 folder (:func:`load_local`).

    Args:
        path: a toy model folder of your own (``scripts/train_toy_model.py out=DIR``); None is
            the committed one.
        resolution: working image side; None reads it from the UNet config (128).
    """
    from dragexp.models.errors import ModelSourceError
    from dragexp.models.pretrained import load_local

    folder = Path(path) if path else WEIGHTS
    if not (folder / "unet").is_dir():
        raise ModelSourceError(f"model=toy: no trained toy model in {folder}; make one with "
                               "`python scripts/train_toy_model.py out=<folder>` and pass "
                               "model.path=<folder>")
    bundle = load_local(str(folder), resolution=resolution)
    bundle.source = "toy" if path is None else f"toy:{folder}"
    return bundle
