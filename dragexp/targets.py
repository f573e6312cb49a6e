"""What a drag optimisation optimises: strategies for :class:`DragOptimisation`.

* :class:`LatentTarget` - DragDiffusion: the noisy latent z_t itself (METHODS.md step 3).
* :class:`ReferenceLatentTarget` - EasyDrag: z_t too, but every step runs the batch
  ``[z_t, frozen inverted z_t]`` with reference attention in the decoder self-attention.
* :class:`BottleneckTarget` - DragNoise: a UNet feature map (the mid-block output).

Each strategy gives the initial value of the optimised tensor, the UNet forward that turns its
current value into (eps, native-resolution features), and the latent on which the one-step
denoise x_{t-1} is taken. A target may also give ``initial_forward`` for F0 when that forward
differs from the per-step one. ``optimises_latent`` says whether the optimised tensor is z_t
(what a gradient w.r.t. z_t, e.g. for the auto mask, needs).
"""

from __future__ import annotations

import torch

from .attention import (CachedReference, RecordKeysValues, reference_attention,
                        self_attention_control, self_attention_names)
from .features import unet_eps_and_features


class LatentTarget:
    """Optimise z_t; every step runs the whole UNet on it."""

    name = "latent"
    optimises_latent = True

    def initial(self, module) -> torch.Tensor:
        return module.z_t.clone()

    def forward(self, module, param: torch.Tensor):
        return unet_eps_and_features(module.unet, param, module.timestep, module.text_embedding,
                                     module.feature_idx)

    def latent(self, module, param: torch.Tensor) -> torch.Tensor:
        return param

    def outcome(self, module) -> tuple[torch.Tensor, None]:
        """(edited latent for denoising, bottleneck to propagate): the optimised z_t, none."""
        return module.result, None


class ReferenceLatentTarget(LatentTarget):
    """EasyDrag: optimise z_t under reference attention to the frozen inverted latent.

    Each step runs the UNet on the batch ``[z_t, z_t^orig]`` (``z_t^orig`` = the module's
    ``z_t`` buffer, the inverted latent, never optimised) with the prompt twice; in every decoder
    self-attention layer the first element's queries attend to the second's keys/values
    (:func:`dragexp.attention.reference_attention`). The step's eps and features are the first
    element's. F0 comes from a plain batch-1 forward without reference attention
    (NOTES_easydrag_dragondiffusion.md items 7-8).

    Args:
        reference: False runs every step at batch 1 without reference (the authors'
            ``training_reference=False``).
        forward_fn: ``f(unet, x, t, text, feature_idx) -> (eps, [native feature maps])``;
            :func:`dragexp.features.unet_eps_and_features` by default. A synthetic stand-in
            model (conformance cases) plugs in here.
        cache_reference: the fast path (``speed.cache_reference``): the reference element is
            frozen, so its decoder keys/values are recorded during the F0 forward (whose input
            is that same latent) and each step runs at batch 1 against them
            (:class:`dragexp.attention.CachedReference`): the same edited-element arithmetic at
            half the batch.
    """

    def __init__(self, reference: bool = True, forward_fn=None, cache_reference: bool = False):
        self.reference = bool(reference)
        self.forward_fn = forward_fn or unet_eps_and_features
        self.cache_reference = bool(cache_reference)
        self.reference_kv: dict = {}

    def _run(self, module, x: torch.Tensor):
        text = module.text_embedding.expand(x.shape[0], -1, -1)
        return self.forward_fn(module.unet, x, module.timestep, text, module.feature_idx)

    def batch_forward(self, module, param: torch.Tensor):
        """(eps, features) of the whole batch ``[param, z_t^orig]`` under reference attention."""
        x = torch.cat([param, module.z_t.to(param.dtype)])
        with reference_attention(module.unet):
            return self._run(module, x)

    def forward(self, module, param: torch.Tensor):
        if not self.reference:
            return self._run(module, param)
        if self.reference_kv:
            with self_attention_control(module.unet, CachedReference(self.reference_kv)):
                return self._run(module, param)
        eps, feats = self.batch_forward(module, param)
        return eps[:1], [f[:1] for f in feats]

    def initial_forward(self, module, param: torch.Tensor):
        if not (self.reference and self.cache_reference):
            return self._run(module, param)
        if not torch.equal(param, module.z_t.to(param.dtype)):
            raise ValueError("cache_reference records the reference from the F0 forward, "
                             "which must run on the inverted latent itself")
        recorder = RecordKeysValues(self_attention_names(module.unet))
        with self_attention_control(module.unet, recorder):
            out = self._run(module, param)
        self.reference_kv = recorder.kv
        return out


class BottleneckTarget:
    """Optimise a UNet feature map for the fixed z_t: the mid-block output by default (DragNoise).

    The encoder pass runs once (:class:`dragexp.unet_split.UNetDecoder`); every optimisation
    step runs only the decoder from the optimised feature on. ``feature`` follows dragexp's
    index convention (0 = mid block, the bottleneck; k = output of ``up_blocks[k-1]``, an
    ablation). The latent is returned unchanged and the optimised map is propagated in denoising.
    """

    optimises_latent = False

    def __init__(self, feature: int = 0):
        self.feature = int(feature)
        self.name = "bottleneck" if self.feature == 0 else f"feature{self.feature}"
        self.decoder = None

    def initial(self, module) -> torch.Tensor:
        from .unet_split import UNetDecoder

        early = [i for i in module.feature_idx if i < self.feature]
        if early:
            raise ValueError(f"supervising features {early} come before the optimised feature "
                             f"{self.feature} and could not change; use method.feature_idx >= "
                             f"{self.feature}")
        self.decoder = UNetDecoder(module.unet, module.z_t, module.timestep, module.text_embedding,
                                   start=self.feature)
        return self.decoder.bottleneck.detach().clone()

    def forward(self, module, param: torch.Tensor):
        from .features import FeatureTap

        later = [i for i in module.feature_idx if i != self.feature]
        with FeatureTap(module.unet, later) as tap:
            eps = self.decoder(param)
        got = dict(zip(later, tap.features)) if later else {}
        return eps, [param if i == self.feature else got[i] for i in module.feature_idx]

    def latent(self, module, param: torch.Tensor) -> torch.Tensor:
        return module.z_t

    def outcome(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        return module.z_t.clone(), module.result
