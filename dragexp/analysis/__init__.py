"""Probes that study a model rather than edit an image (DragNoise's feature replacement)."""
