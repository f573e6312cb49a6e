"""EasyDrag's optimisation target: z_t under reference attention to the frozen inverted latent."""

from __future__ import annotations

import torch

from ...core.attention import (CachedReference, RecordKeysValues, reference_attention,
                               self_attention_control, self_attention_names)
from ...core.features import FeatureTap, tapped_forward, unet_eps_and_features
from ...drag.targets import DragProblem, LatentTarget


class ReferenceLatentTarget(LatentTarget):
    """EasyDrag: optimise z_t under reference attention to the frozen inverted latent.

    Each step runs the UNet on the batch ``[z_t, z_t^orig]`` (``z_t^orig`` = the problem's
    ``z_t``, the inverted latent, never optimised) with the prompt twice; in every decoder
    self-attention layer the first element's queries attend to the second's keys/values
    (:func:`dragexp.attention.reference_attention`). The step's eps and features are the first
    element's. F0 comes from a plain batch-1 forward without reference attention
    (docs/methods.md, EasyDrag 7-8).

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

    def _run(self, problem: DragProblem, x: torch.Tensor):
        text = problem.text_embedding.expand(x.shape[0], -1, -1)
        return self.forward_fn(problem.unet, x, problem.timestep, text, list(problem.feature_idx))

    def batch_forward(self, problem: DragProblem, param: torch.Tensor):
        """(eps, features) of the whole batch ``[param, z_t^orig]`` under reference attention."""
        x = torch.cat([param, problem.z_t.to(param.dtype)])
        with reference_attention(problem.unet):
            return self._run(problem, x)

    def forward(self, problem: DragProblem, param: torch.Tensor):
        if not self.reference:
            return self._run(problem, param)
        if self.reference_kv:
            with self_attention_control(problem.unet, CachedReference(self.reference_kv)):
                return self._run(problem, param)
        eps, feats = self.batch_forward(problem, param)
        return eps[:1], [f[:1] for f in feats]

    def step_forward(self, problem: DragProblem, stack):
        """:meth:`forward` with the tap and the reference attention (recorded keys/values, or
        the batch ``[z_t, z_t^orig]``) set up once on ``stack``
        (:meth:`dragexp.drag.targets.LatentTarget.step_forward`)."""
        if self.forward_fn is not unet_eps_and_features:
            return lambda param: self.forward(problem, param)
        unet, t = problem.unet, problem.timestep
        if self.reference and self.reference_kv:
            stack.enter_context(self_attention_control(unet, CachedReference(self.reference_kv)))
        elif self.reference:
            stack.enter_context(reference_attention(unet))
        tap = stack.enter_context(FeatureTap(unet, problem.feature_idx))
        if not self.reference or self.reference_kv:
            return lambda param: tapped_forward(unet, tap, param, t, problem.text_embedding)
        text = problem.text_embedding.expand(2, -1, -1)

        def batch(param):
            x = torch.cat([param, problem.z_t.to(param.dtype)])
            eps, feats = tapped_forward(unet, tap, x, t, text)
            return eps[:1], [f[:1] for f in feats]
        return batch

    def initial_forward(self, problem: DragProblem, param: torch.Tensor):
        if not (self.reference and self.cache_reference):
            return self._run(problem, param)
        if not torch.equal(param, problem.z_t.to(param.dtype)):
            raise ValueError("cache_reference records the reference from the F0 forward, "
                             "which must run on the inverted latent itself")
        recorder = RecordKeysValues(self_attention_names(problem.unet))
        with self_attention_control(problem.unet, recorder):
            out = self._run(problem, param)
        self.reference_kv = recorder.kv
        return out
