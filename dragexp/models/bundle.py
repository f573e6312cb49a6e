"""The diffusion components a method needs, loaded once per process and passed around together."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class ModelBundle:
    """UNet, VAE, text encoder and tokenizer of one Stable Diffusion 1.5-family model.

    The bundle holds no scheduler: schedules are arithmetic shared by every method
    (``dragexp.core.schedule``) and do not depend on which weights are loaded.

    Attributes:
        unet: the noise-prediction UNet.
        vae: the autoencoder mapping images in [-1, 1] to latents (8x smaller per side).
        text_encoder: CLIP text transformer whose last hidden state conditions the UNet.
        tokenizer: the tokenizer matching ``text_encoder``.
        resolution: image side the model was trained at (512 for SD 1.5, 128 for the tiny model).
        source: human-readable origin, e.g. ``"tiny(seed=0)"``, ``"hub:<id>"``,
            ``"local:<path>"`` or ``"single_file:<path>"``.
    """

    # Left out of repr: printing whole networks buries the bundle's identity in logs.
    unet: UNet2DConditionModel = field(repr=False)
    vae: AutoencoderKL = field(repr=False)
    text_encoder: CLIPTextModel = field(repr=False)
    tokenizer: CLIPTokenizer = field(repr=False)
    resolution: int
    source: str

    @property
    def scaling_factor(self) -> float:
        """The factor latents are multiplied by after encoding (0.18215 for SD 1.5)."""
        return float(self.vae.config.scaling_factor)

    @property
    def device(self) -> torch.device:
        """The device the UNet's parameters live on (all modules are moved together)."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's parameter dtype."""
        return next(self.unet.parameters()).dtype

    def _modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.unet, self.vae, self.text_encoder)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ModelBundle":
        """Moves every module to ``device`` (and ``dtype``), frozen and in eval mode.

        Methods that train something (LoRA, a latent) add their own trainable parameters on top;
        the base weights are never trained, so freezing them here keeps them out of every
        optimiser and autograd graph by default.

        Args:
            device: target device.
            dtype: target floating-point dtype, or None to keep the current one.

        Returns:
            This bundle (modified in place), for chaining.
        """
        for module in self._modules():
            if dtype is None or all(p.dtype == dtype for p in module.parameters()):
                # Not passing dtype at all: diffusers warns on every dtype cast, even a no-op one.
                module.to(device)
            else:
                module.to(device=device, dtype=dtype)
            module.eval()
            module.requires_grad_(False)
        return self

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text embedding that conditions the UNet: CLIP's last hidden state.

        The prompt is padded to the tokenizer's ``model_max_length`` (77) and truncated, as in
        Stable Diffusion's pipelines, so the result always has the full sequence length.

        Args:
            prompt: the text prompt (may be empty).

        Returns:
            Tensor ``(1, model_max_length, D)`` on the bundle's device, in the text encoder's dtype.
        """
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device))[0]

    @torch.no_grad()
    def encode_image(
        self,
        image: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Scaled VAE latent of an image batch.

        Sides need not be multiples of 8: the encoder's strided convolutions floor, so a
        341-row image gives 42 latent rows.

        Args:
            image: ``(B, 3, H, W)`` float in [-1, 1].
            sample: False for the posterior mean (deterministic, what inversion uses); True for
                a posterior sample (what LoRA fine-tuning uses).
            generator: random generator for the posterior sample.

        Returns:
            ``(B, 4, H // 8, W // 8)`` latent multiplied by ``scaling_factor``, in the VAE's dtype.
        """
        param = next(self.vae.parameters())
        posterior = self.vae.encode(image.to(device=param.device, dtype=param.dtype)).latent_dist
        latent = posterior.sample(generator) if sample else posterior.mean
        return latent * self.scaling_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Image for a scaled latent: the inverse of :meth:`encode_image`.

        Args:
            latent: ``(B, 4, h, w)`` latent as returned by :meth:`encode_image`.

        Returns:
            ``(B, 3, 8h, 8w)`` image in [-1, 1] (clamped), in the VAE's dtype.
        """
        param = next(self.vae.parameters())
        latent = latent.to(device=param.device, dtype=param.dtype) / self.scaling_factor
        return self.vae.decode(latent).sample.clamp(-1.0, 1.0)
