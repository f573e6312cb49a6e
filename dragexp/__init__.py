"""dragexp: drag-based diffusion image editing as Lightning modules and Hydra experiments."""

__version__ = "0.1.0"
