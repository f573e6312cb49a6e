"""Drag-editing methods built from the shared parts."""

from .latent_drag import DenoiseSettings, EditResult, LatentDragMethod

__all__ = ["DenoiseSettings", "EditResult", "LatentDragMethod"]
