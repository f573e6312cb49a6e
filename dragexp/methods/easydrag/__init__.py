"""EasyDrag: a latent drag under reference attention, with its own losses and guidance.

* :mod:`.method` - the edit;
* :mod:`.reference` - its optimisation target (z_t under reference attention).
"""

from .method import EasyDragMethod

__all__ = ["EasyDragMethod"]
