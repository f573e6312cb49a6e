"""Drag-editing methods built from the shared parts, all behind one contract (:mod:`.base`)."""

from .base import DragMethod, EditContext, EditResult
from .easydrag import EasyDragMethod
from .latent_drag import DenoiseSettings, LatentDragMethod

__all__ = ["DenoiseSettings", "DragMethod", "EasyDragMethod", "EditContext", "EditResult",
           "LatentDragMethod"]
