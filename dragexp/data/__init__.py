"""Drag samples: the :class:`DragSample` type, its validation, and lazy sample sources.

- :class:`ProceduralSamples`: synthetic shapes with known drags (no files).
- :class:`ToyBench`: toy-world scenes with known drags and their ground-truth edited images.
- :class:`FolderSamples`: a user's own edits, ``root/<sample>/{image.png, drag.yaml, mask.png}``;
  :func:`write_sample_folder` writes that layout.
- :class:`DragBenchSamples`: DragBench, ``root/<category>/<sample>/{original_image.png,
  meta_data.pkl}``, pickles read with a restricted unpickler.
"""

from .dragbench import DragBenchSamples
from .folder import FolderSamples, write_sample_folder
from .procedural import ProceduralSamples
from .toybench import ToyBench
from .sample import DragSample, SampleError, SampleSource, validate_sample

__all__ = [
    "DragSample",
    "SampleError",
    "SampleSource",
    "validate_sample",
    "ProceduralSamples",
    "FolderSamples",
    "DragBenchSamples",
    "ToyBench",
    "write_sample_folder",
]
