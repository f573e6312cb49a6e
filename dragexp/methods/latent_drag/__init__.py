"""DragDiffusion and DragNoise: one latent-optimising method, DragNoise being its bottleneck target.

* :mod:`.method` - the edit: LoRA, inversion, the drag optimisation, denoising (with DragNoise's
  bottleneck propagation, :func:`.method.denoise`);
* :mod:`.bottleneck` - DragNoise's optimised bottleneck (:class:`.bottleneck.BottleneckTarget`);
* :mod:`.unet_split` - the UNet run from its bottleneck on, once the encoder pass is recorded.
"""

from .method import DenoiseSettings, LatentDragMethod

__all__ = ["DenoiseSettings", "LatentDragMethod"]
