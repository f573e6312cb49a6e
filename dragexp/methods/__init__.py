"""Drag-editing methods built from the shared parts."""

from .easydrag import EasyDragMethod
from .latent_drag import DenoiseSettings, EditResult, LatentDragMethod

__all__ = ["DenoiseSettings", "EasyDragMethod", "EditResult", "LatentDragMethod"]
