"""Noise prediction and the shared DDIM sampling loop.

:class:`NoisePredictor` turns the UNet into ``eps(x, t, i)`` with optional classifier-free
guidance and an optional mid-block (bottleneck) substitution; :class:`ReferenceGuidance` is
EasyDrag's ``eps(x, t, i)`` with reference guidance; :func:`ddim_sample` runs the denoising from
any schedule index with an attention controller's step counter kept in sync.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import (AttentionController, IndexedReference, reference_attention,
                        self_attention_control)
from .features import feature_module, replace_output
from .schedule import DDIMSchedule, ddim_step


class NoisePredictor:
    """eps(x, t, i) for a batch of latents sharing one prompt.

    Args:
        unet: the (possibly LoRA-adapted) UNet.
        cond: prompt embedding (1, L, D); repeated over the batch.
        uncond: negative-prompt embedding for CFG; needed only if ``guidance != 1``.
        guidance: CFG scale. With CFG the UNet sees ``[x, x]`` with ``[uncond..., cond...]``
            and eps = eps_u + g (eps_c - eps_u) (DragDiffusion's generated-image path).
        bottleneck: optional tensor substituted for the mid-block output (DragNoise's
            propagation), used at schedule index ``i`` while ``bottleneck_until(i)`` holds;
            ``bottleneck_feature`` says which feature map it replaces (0 = mid block).
        gated: the captured form (``speed=graphs``): with a bottleneck, every call replaces
            the output through ``torch.where`` on a gate tensor holding ``bottleneck_until(i)``,
            so the steps with and without the substitution are one traced graph (the eager
            form adds the replacing hook only where it acts).
    """

    def __init__(self, unet: nn.Module, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                 guidance: float = 1.0, bottleneck: torch.Tensor | None = None,
                 bottleneck_until: Callable[[int], bool] | None = None,
                 bottleneck_feature: int = 0, gated: bool = False):
        self.unet = unet
        self.cond = cond
        self.uncond = uncond
        self.guidance = float(guidance)
        self.bottleneck = bottleneck
        self.bottleneck_until = bottleneck_until or (lambda i: True)
        self.bottleneck_module = feature_module(unet, bottleneck_feature)
        self.last_raw_eps: torch.Tensor | None = None
        self.last_injected = False
        self._cfg_text: dict[tuple, torch.Tensor] = {}
        self.gated = bool(gated) and bottleneck is not None
        self._gate = torch.zeros((), dtype=torch.bool, device=cond.device)

    @property
    def cfg(self) -> bool:
        return self.guidance != 1.0

    def _bottleneck_over(self, batch: int) -> torch.Tensor:
        h = self.bottleneck
        return h.expand(batch, *h.shape[1:]) if h.shape[0] == 1 else h

    def __call__(self, x: torch.Tensor, t: int, i: int = 0) -> torch.Tensor:
        b = x.shape[0]
        if self.cfg:
            if self.uncond is None:
                raise ValueError("guidance != 1 needs a negative-prompt embedding (uncond)")
            x_in = torch.cat([x, x])
            # one tensor per edit: the fast path then computes its cross-attention K/V once
            key = (b, self.uncond._version, self.cond._version)
            text = self._cfg_text.get(key)
            if text is None:
                text = self._cfg_text[key] = torch.cat([self.uncond.expand(b, -1, -1),
                                                      self.cond.expand(b, -1, -1)])
        else:
            x_in, text = x, self.cond.expand(b, -1, -1)
        inject = self.bottleneck is not None and bool(self.bottleneck_until(i))
        self.last_injected = inject
        h = self._bottleneck_over(x_in.shape[0]) if inject or self.gated else None
        if self.gated:
            self._gate.fill_(inject)
        with replace_output(self.bottleneck_module, h, self._gate if self.gated else None):
            eps = self.unet(x_in, t, encoder_hidden_states=text, return_dict=False)[0]
        self.last_raw_eps = eps
        if self.cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + self.guidance * (eps_c - eps_u)
        return eps


class ReferenceAttentionUNet:
    """``model(x, t, text) -> eps``: the UNet, with EasyDrag's reference attention in batches.

    In a batch ``[x, reference]`` the first element's decoder self-attention reads the second's
    keys/values (:func:`dragexp.core.attention.reference_attention`); a batch of one is the plain UNet.
    """

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self._guided_text: tuple | None = None

    def __call__(self, x: torch.Tensor, t: int, text: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self.unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
        with reference_attention(self.unet):
            return self.unet(x, t, encoder_hidden_states=text, return_dict=False)[0]

    def guided(self, x: torch.Tensor, ref: torch.Tensor, t: int, cond: torch.Tensor,
               uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_u, eps_c) of a reference-guided step from one call on ``[x, x, ref]``: x with
        the negative prompt (plain attention), x with the prompt reading ref's decoder
        keys/values, and ref with the prompt, as ``[x, ref]`` and ``x`` compute them apart."""
        batch = torch.cat([x, x, ref])
        # built once per (uncond, cond): the fast path then computes its cross-attention K/V once
        cached = self._guided_text
        versions = (uncond._version, cond._version)
        if cached is None or cached[0] is not uncond or cached[1] is not cond or \
                cached[2] != versions:
            cached = self._guided_text = (uncond, cond, versions, torch.cat([uncond, cond, cond]))
        text = cached[3]
        with self_attention_control(self.unet, IndexedReference([0, 2, 2])):
            eps = self.unet(batch, t, encoder_hidden_states=text, return_dict=False)[0]
        return eps[:1], eps[1:2]


class ReferenceGuidance:
    """EasyDrag's noise prediction in the final denoising (docs/methods.md, EasyDrag 4).

    With k = ``num_inference_steps - 1 - i`` the authors' loop index (k = 34 .. 0 for a 35-step
    edit) and s the guidance scale:

    * reference-guided steps (``enabled`` and k < ``ref_start_step``, the last 20 by default):
      eps_c = model([x, ref_k], t, [cond, cond])[0] with reference attention, eps_u =
      model(x, t, uncond) at batch 1, eps = eps_u + s (eps_c - eps_u);
    * other steps: plain classifier-free guidance with two batch-1 calls.

    With s = 1 only eps_c is computed. The reference latent ``ref_k`` is the inversion latent
    ``inversion_latents[k + 1 - offset]`` (``inversion_latents[j]`` is at the j-th inversion
    timestep, ``[0]`` the clean latent). ``offset=1`` is the authors' code: the reference is one
    step *less* noisy than x, though fed with x's timestep (docs/methods.md,
    EasyDrag 3); ``offset=0`` takes the inversion latent at x's own timestep.

    When the negative prompt equals the prompt (EasyDrag's default ``neg_same_prompt``), the
    unguided steps' CFG collapses exactly to eps_c, and the redundant batch-1 call is skipped.

    Args:
        model: ``model(x, t, text) -> eps`` (:class:`ReferenceAttentionUNet` for a UNet).
        cond, uncond: prompt and negative-prompt embeddings (1, L, D).
        guidance: s (4).
        inversion_latents: every latent of the full inversion.
        num_inference_steps: schedule length (50).
        ref_start_step: reference guidance while k < this (20).
        offset: 1 (faithful) or 0.
        enabled: False gives plain CFG everywhere (the authors' ``reference_only=False``).
        batched: the fast path (``speed.batch_guidance``): a guided step's two predictions in
            one UNet call (``model.guided``), when the model offers it.
    """

    def __init__(self, model, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
                 inversion_latents: list[torch.Tensor], num_inference_steps: int = 50,
                 ref_start_step: int = 20, offset: int = 1, enabled: bool = True,
                 batched: bool = False):
        if offset not in (0, 1):
            raise ValueError(f"reference offset must be 1 (authors' code) or 0, got {offset}")
        self.model = model
        self.cond = cond
        self.uncond = cond if uncond is None else uncond
        self.guidance = float(guidance)
        self.latents = inversion_latents
        self.n = int(num_inference_steps)
        self.ref_start_step = int(ref_start_step)
        self.offset = int(offset)
        self.enabled = bool(enabled)
        self.batched = bool(batched) and hasattr(model, "guided")
        self.same_prompt = self.uncond is self.cond or (
            self.uncond.shape == self.cond.shape and bool(torch.equal(self.uncond, self.cond)))
        self.calls: list[tuple[int, int, bool]] = []     # (schedule index, t, reference-guided)

    def loop_index(self, i: int) -> int:
        return self.n - 1 - int(i)

    def guided(self, i: int) -> bool:
        return self.enabled and self.loop_index(i) < self.ref_start_step

    def reference(self, i: int) -> torch.Tensor:
        return self.latents[self.loop_index(i) + 1 - self.offset]

    def __call__(self, x: torch.Tensor, t: int, i: int = 0) -> torch.Tensor:
        guided = self.guided(i)
        self.calls.append((int(i), int(t), guided))
        if guided and self.batched and self.guidance != 1.0:
            eps_u, eps_c = self.model.guided(x, self.reference(i).to(x), t, self.cond,
                                             self.uncond)
            return eps_u + self.guidance * (eps_c - eps_u)
        if guided:
            ref = self.reference(i).to(x)
            eps_c = self.model(torch.cat([x, ref]), t, self.cond.expand(2, -1, -1))[:1]
        else:
            eps_c = self.model(x, t, self.cond)
        if self.guidance == 1.0 or (not guided and self.same_prompt):
            return eps_c
        eps_u = self.model(x, t, self.uncond)
        return eps_u + self.guidance * (eps_c - eps_u)


@torch.no_grad()
def ddim_sample(eps_fn: Callable[[torch.Tensor, int, int], torch.Tensor], x: torch.Tensor,
                schedule: DDIMSchedule, start_index: int,
                controller: AttentionController | None = None,
                on_step: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Denoise ``x`` from ``schedule.timesteps[start_index]`` to t = 0 with eta-0 DDIM steps.

    The loop index ``i`` runs over the whole schedule and the first ``start_index`` steps are
    skipped, as the references do (it matters for index-based rules such as DragNoise's
    ``i < 50 - end_step``). The controller's step counter counts executed steps from 0.
    ``on_step(i, t, x_after)`` is called after every executed step.
    """
    if controller is not None:
        controller.step = 0
    for i, t in enumerate(schedule.timesteps):
        if i < start_index:
            continue
        eps = eps_fn(x, t, i)
        x = ddim_step(eps, t, x, schedule)
        if controller is not None:
            controller.step += 1
        if on_step is not None:
            on_step(i, t, x)
    return x
