"""A FreeDrag-like method (docs/ADDING_A_METHOD.md): DragDiffusion's loop with one new tracker.

* :mod:`.tracker` - :class:`~.tracker.LineSearchTracker`, the line search that replaces the
  nearest-feature search; ``configs/method/freedrag_like.yaml`` and
  ``configs/callbacks/freedrag_like.yaml`` put it in DragDiffusion's loop.
"""

from .tracker import LineSearchTracker

__all__ = ["LineSearchTracker"]
