"""DragonDiffusion's energies on decoder features, and the guidance they give.

docs/methods.md, DragonDiffusion 8-12: the estimator is
the plain UNet with the prompt (no image tokens, no memory bank); its ``up_blocks[k]`` outputs
(``up_ft_index``, default ``[1, 2]``) are nearest-resized to ``up_scale`` x the finest of them
(1/4 image for the default) and compared per layer, never concatenated. Similarity is the cosine
along channels, ``(cos + 1) / 2`` where the authors use it, and an energy term is
``w / (1 + 4 S)`` (alpha = 1, beta = 4) or ``w S``.

Each guidance function returns the step added to the noise prediction used for x0,
``step * (grad(E_edit * es) * M + grad(E_content * es) * (1 - M))``, with the two gradients taken
separately (two ``autograd.grad`` calls) as the authors do. The fast path
(``speed.batch_guidance``) gets the same two gradients from one estimator call and one backward:
the latent goes in twice, as two leaves (E_edit is read from the first copy's features, E_content
from the second's), with the step's inversion latent(s) for the reference features
(:class:`ReferenceLatents`) in the same batch.

Empty regions: the authors average over a region that can be empty (a handle patch equal to
its target patch leaves no vacated pixels; an object moved onto itself leaves no
non-overlap). Their energy is then NaN (a mean over nothing) while the gradient stays finite (an
empty term has no gradient). Here every mean goes through :class:`Energy`, which records an empty
term as NaN in the *reported* energy and leaves it out of the *differentiated* one, so both
behaviours are reproduced explicitly rather than by relying on NaN propagation.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...core.features import FeatureTap

__all__ = [
    "GuidanceResult", "Energy", "resize_features", "masked_vectors", "similarity",
    "drag_energies", "move_energies", "blend_energies", "guidance_drag", "guidance_move",
    "guidance_appearance", "guidance_paste", "DecoderFeatureEstimator",
    "ReferenceLatents",
]

Estimator = Callable[[torch.Tensor, object], list]


@dataclass
class GuidanceResult:
    """One guided call: the guidance and what produced it.

    ``energy_edit`` / ``energy_content`` are the scaled energies (``E * energy_scale``) as the
    authors compute them, NaN where one of their means is over an empty region.
    """

    guidance: torch.Tensor
    energy_edit: torch.Tensor
    energy_content: torch.Tensor
    grad_edit: torch.Tensor
    grad_content: torch.Tensor


class Energy:
    """A sum of energy terms kept twice: as reported (NaN once a term is over an empty region)
    and as differentiated (empty terms left out, so their zero gradient is explicit)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | float = 0
        self.empty = False

    def add(self, term: torch.Tensor | None) -> None:
        if term is None:
            self.empty = True
        else:
            self.value = self.value + term

    def divide(self, n: int) -> None:
        self.value = self.value / n

    def scaled(self, scale: float):
        return self.value * scale

    def reported(self, scale: float, like: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(self.scaled(scale), dtype=like.dtype, device=like.device).detach()
        return torch.full_like(v, float("nan")) if self.empty else v.clone()


def _mean(x: torch.Tensor) -> torch.Tensor | None:
    return None if x.numel() == 0 else x.mean()


def _inv(weight: float, s: torch.Tensor | None) -> torch.Tensor | None:
    """``w / (1 + 4 S)`` (alpha = 1, beta = 4), or None for an empty region."""
    return None if s is None else weight / (1 + 4 * s)


def resize_features(features: Sequence[torch.Tensor], up_scale: int,
                    factor: float = 1.0) -> list[torch.Tensor]:
    """Nearest-resize every map to ``int(H_last * factor * up_scale)`` x ``int(W_last * ...)``,
    where ``(H_last, W_last)`` is the size of the *last* map (the finest for the defaults)."""
    h, w = features[-1].shape[-2:]
    size = (int(h * factor * up_scale), int(w * factor * up_scale)) if factor != 1.0 else \
        (h * up_scale, w * up_scale)
    return [F.interpolate(f, size) for f in features]


def masked_vectors(feature: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) features at a (H, W) / (1, 1, H, W) boolean mask -> (n, C), raster order."""
    m = mask.reshape(mask.shape[-2:]).bool()
    return feature[0][:, m].transpose(0, 1)


def _cos(a: torch.Tensor, b: torch.Tensor, what: str = "") -> torch.Tensor:
    if a.dim() == 2 and b.dim() == 2 and a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"{what}: {a.shape[0]} feature vectors cannot be paired with "
                         f"{b.shape[0]} (regions of different sizes)")
    return F.cosine_similarity(a, b, dim=1)


def similarity(a: torch.Tensor, b: torch.Tensor, what: str = "") -> torch.Tensor:
    """``(cos + 1) / 2`` along channels."""
    return (_cos(a, b, what) + 1.0) / 2.0


# -- energies (pure functions of features and masks) ---------------------------------------

def drag_energies(cur: Sequence[torch.Tensor], ref: Sequence[torch.Tensor],
                  handle_patches: torch.Tensor, target_patches: torch.Tensor,
                  mask_other: torch.Tensor, w_edit: float, w_inpaint: float,
                  w_content: float, inpaint: bool = True) -> tuple[Energy, Energy]:
    """E_edit and E_content of a point drag, on resized features (docs/methods.md,
    DragonDiffusion 9).

    For each layer and pair: ``w_edit / (1 + 4 mean S(cur[target], ref[handle]))`` plus
    ``w_inpaint * mean S(cur[R], ref[R])`` with R the handle patch minus its overlap with the
    target patch; divided by #layers * #pairs. E_content is
    ``w_content / (1 + 4 mean S(ref, cur) over mask_other)`` averaged over layers.

    The vacated-region term is the drag task's optional energy (E_opt of the paper's Eq. 7, the
    dissimilarity half of Eq. 9); ``inpaint=False`` leaves it out altogether (the "without
    inpainting guidance" ablation, paper Fig. 5), so an empty vacated region no longer makes
    the reported energy NaN.
    """
    e_edit, e_con = Energy(), Energy()
    for f in range(len(ref)):
        for k, (m_cur, m_tar) in enumerate(zip(target_patches, handle_patches)):
            s = similarity(masked_vectors(cur[f], m_cur), masked_vectors(ref[f], m_tar),
                           f"pair {k}: target patch vs handle patch")
            e_edit.add(_inv(w_edit, _mean(s)))
            if not inpaint:
                continue
            overlap = ((m_cur.float() + m_tar.float()) > 1.5).float()
            vacated = (m_tar.float() - overlap) > 0.5
            s = similarity(masked_vectors(cur[f], vacated), masked_vectors(ref[f], vacated))
            m = _mean(s)
            e_edit.add(None if m is None else w_inpaint * m)
    for f in range(len(ref)):
        s = (F.cosine_similarity(ref[f], cur[f], dim=1)[0][mask_other.reshape(mask_other.shape[-2:]).bool()] + 1.0) / 2.0
        e_con.add(_inv(w_content, _mean(s)))
    e_edit.divide(len(cur))
    e_edit.divide(len(target_patches))
    e_con.divide(len(cur))
    return e_edit, e_con


def move_energies(cur, ref_org, ref_resized, mask_tar, mask_cur, mask_other, mask_non_overlap,
                  mask_ref_region, w_edit, w_content, w_contrast, w_inpaint,
                  layer_weights: Sequence[float], inpaint: bool = True) -> tuple[Energy, Energy]:
    """Move / resize energies (docs/methods.md, DragonDiffusion 12): raw cosine in the edit
    and content terms, weighted per layer; contrast ``w_contrast * mean S`` on the vacated
    region; a global inpaint term on its mean feature against the mean of the reference region
    (not layer-weighted).

    The contrast and inpaint terms together are the paper's inpainting guidance E_opt (Eq. 9);
    ``inpaint=False`` leaves both out (the "Moving w/o E_opt" ablation, paper Fig. 5)."""
    if len(layer_weights) != len(cur):
        raise ValueError(f"move energies need one layer weight per feature layer: "
                         f"{len(layer_weights)} weights for {len(cur)} layers (up_ft_index)")
    e_edit, e_con = Energy(), Energy()
    for f in range(len(ref_resized)):
        c = masked_vectors(cur[f], mask_cur)
        r = masked_vectors(ref_resized[f], mask_tar)
        e_edit.add(None if c.shape[0] == 0 else _inv(w_edit, _cos(c, r, "object").mean()) * layer_weights[f])
    other = mask_other.reshape(mask_other.shape[-2:]).bool()
    for f in range(len(ref_org)):
        s = F.cosine_similarity(ref_org[f], cur[f], dim=1)[0][other]
        t = _inv(w_content, _mean(s))
        e_con.add(None if t is None else t * layer_weights[f])
    for f in range(len(ref_resized) if inpaint else 0):
        c = masked_vectors(cur[f], mask_non_overlap)
        r = masked_vectors(ref_org[f], mask_non_overlap)
        m = _mean(similarity(c, r))
        e_con.add(None if m is None else w_contrast * m * layer_weights[f])
        r_all = masked_vectors(ref_org[f], mask_ref_region)
        if c.shape[0] == 0 or r_all.shape[0] == 0:
            e_con.add(None)
        else:
            s = similarity(c.mean(0, keepdim=True), r_all.mean(0, keepdim=True))
            e_con.add(_inv(w_inpaint, s.mean()))
    return e_edit, e_con


def blend_energies(cur, ref_base, ref_replace, mask_base_cur, mask_replace_cur, w_edit,
                   w_content, pooled: bool) -> tuple[Energy, Energy]:
    """Appearance (``pooled``: mean features) and paste (per-pixel) energies: E_content keeps the
    base image outside the object, E_edit pulls the object towards the second image's."""
    e_edit, e_con = Energy(), Energy()
    outside = (1 - mask_base_cur.float()) > 0.5
    for f in range(len(ref_base)):
        s = similarity(masked_vectors(cur[f], outside), masked_vectors(ref_base[f], outside))
        e_con.add(_inv(w_content, _mean(s)))
    for f in range(len(ref_replace)):
        c = masked_vectors(cur[f], mask_base_cur)
        r = masked_vectors(ref_replace[f], mask_replace_cur)
        if c.shape[0] == 0 or r.shape[0] == 0:
            e_edit.add(None)
            continue
        if pooled:
            c, r = c.mean(0, keepdim=True), r.mean(0, keepdim=True)
        e_edit.add(_inv(w_edit, similarity(c, r, "object vs second image's object").mean()))
    return e_edit, e_con


# -- guidance ------------------------------------------------------------------------------

def _grad(energy, latent: torch.Tensor, retain: bool) -> torch.Tensor:
    if not (torch.is_tensor(energy) and energy.requires_grad):
        return torch.zeros_like(latent)
    return torch.autograd.grad(energy, latent, retain_graph=retain)[0]


def _grads(energies: Sequence, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``d energies[k] / d leaves[k]`` for distinct leaves, from one backward of their sum (each
    energy depends on its own leaf only, so the sum's gradient at a leaf is that energy's)."""
    live = [k for k, e in enumerate(energies) if torch.is_tensor(e) and e.requires_grad]
    out = [torch.zeros_like(x) for x in leaves]
    if live:
        got = torch.autograd.grad(sum(energies[k] for k in live), [leaves[k] for k in live],
                                  allow_unused=True)
        for k, g in zip(live, got):
            if g is not None:
                out[k] = g
    return out


def _combine(leaves: tuple[torch.Tensor, torch.Tensor], e_first: Energy, e_second: Energy,
             energy_scale: float, first_is_edit: bool, mask: torch.Tensor,
             step: float) -> GuidanceResult:
    """Two gradients, mixed by the latent mask: the first energy's at ``leaves[0]``, the
    second's at ``leaves[1]``. One leaf (the authors' way): two backward passes, the first with
    the graph retained; two leaves (:func:`_estimate` with ``split``): one backward."""
    s1, s2 = e_first.scaled(energy_scale), e_second.scaled(energy_scale)
    if leaves[0] is leaves[1]:
        g1 = _grad(s1, leaves[0], retain=True)
        g2 = _grad(s2, leaves[0], retain=False)
    else:
        g1, g2 = _grads([s1, s2], leaves)
    latent = leaves[0]
    e_edit, e_con = (e_first, e_second) if first_is_edit else (e_second, e_first)
    g_edit, g_con = (g1, g2) if first_is_edit else (g2, g1)
    if first_is_edit:
        guidance = g_edit.detach() * step * mask + g_con.detach() * step * (1 - mask)
    else:
        guidance = g_con.detach() * (1 - mask) * step + g_edit.detach() * mask * step
    return GuidanceResult(guidance, e_edit.reported(energy_scale, latent),
                          e_con.reported(energy_scale, latent), g_edit.detach(), g_con.detach())


class ReferenceLatents:
    """Reference features not computed yet: the step's inversion latent(s) ``(m, 4, h, w)``,
    to run through the estimator in the same call as the current latent (the fast path)."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents


def _estimate(estimator: Estimator, latent: torch.Tensor, t, up_scale: int, refs: Sequence,
              split: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], list, list]:
    """One guided step's estimator call: (leaves, current features per leaf resized by
    ``up_scale``, raw reference features per entry of ``refs``).

    Without ``split`` and with feature lists as ``refs``, this is the authors' call: the
    latent alone, one leaf (returned twice). With ``split`` the latent goes in as two leaves;
    :class:`ReferenceLatents` in ``refs`` join the same batch. Batch elements do not interact in
    the UNet (per-sample normalisation and attention), so each part gets what its own call
    would give, up to the rounding of a larger batch.
    """
    n = latent.shape[0]
    with torch.enable_grad():
        leaves = [latent.detach().requires_grad_(True) for _ in range(2 if split else 1)]
        batch = leaves + [r.latents.to(latent).detach() for r in refs
                          if isinstance(r, ReferenceLatents)]
        if len(batch) == 1:
            cur = [resize_features(estimator(batch[0], t), up_scale)]
            return (leaves[0], leaves[0]), cur, list(refs)
        feats = estimator(torch.cat(batch), t)
        cur = [resize_features([f[k * n:(k + 1) * n] for f in feats], up_scale)
               for k in range(len(leaves))]
    start = len(leaves) * n
    raw = []
    for r in refs:
        if isinstance(r, ReferenceLatents):
            m = r.latents.shape[0]
            raw.append([f[start:start + m].detach() for f in feats])
            start += m
        else:
            raw.append(r)
    return (leaves[0], leaves[-1]), cur, raw


def _pair(energies: Callable[[Sequence[torch.Tensor]], tuple[Energy, Energy]],
          cur: list) -> tuple[Energy, Energy]:
    """The two energies: both from one feature set, or the first from ``cur[0]`` and the second
    from ``cur[1]`` (one per leaf)."""
    first = energies(cur[0])
    return first if len(cur) == 1 else (first[0], energies(cur[1])[1])


def guidance_drag(estimator: Estimator, latent: torch.Tensor, ref_features: Sequence[torch.Tensor],
                  t, mask_x0: torch.Tensor, handle_patches: torch.Tensor,
                  target_patches: torch.Tensor, mask_other: torch.Tensor, energy_scale: float,
                  w_edit: float, w_inpaint: float, w_content: float, up_scale: int = 2,
                  step: float = 4e-2, inpaint: bool = True, split: bool = False) -> GuidanceResult:
    """Point-drag guidance (``guidance_drag``; docs/methods.md, DragonDiffusion 9-11).

    Args:
        estimator: ``(latent, t) -> [decoder feature maps]`` (the plain UNet's up_blocks outputs).
        ref_features: the estimator's maps for the inversion latent at this step (raw size),
            or that latent as :class:`ReferenceLatents` (computed in the same call).
        mask_x0: (H, W) working-size user mask; M = nearest to the latent, > 0.
        handle_patches / target_patches: (N, Hf, Wf) boolean 3x3 patches.
        mask_other: (1, 1, Hf, Wf) content region.
        energy_scale: absolute scale (the UI's value x 1e3).
        inpaint: the vacated-region term (inpainting guidance) on; False = the ablation.
        split: both gradients from one backward (:func:`_estimate`; the fast path).
    """
    leaves, cur, (ref_raw,) = _estimate(estimator, latent, t, up_scale, [ref_features], split)
    with torch.no_grad():
        ref = resize_features(ref_raw, up_scale)
    with torch.enable_grad():
        e_edit, e_con = _pair(lambda c: drag_energies(c, ref, handle_patches, target_patches,
                                                      mask_other, w_edit, w_inpaint, w_content,
                                                      inpaint), cur)
        mask = (F.interpolate(mask_x0.reshape(1, 1, *mask_x0.shape[-2:]).float(), latent.shape[-2:]) > 0
                ).to(latent.dtype)
        return _combine(leaves, e_edit, e_con, energy_scale, True, mask, step)


def guidance_move(estimator: Estimator, latent: torch.Tensor, ref_features, t, regions,
                  energy_scale: float, w_edit: float, w_content: float, w_contrast: float,
                  w_inpaint: float, up_scale: int = 2, layer_weights=None,
                  step: float = 8e-2, inpaint: bool = True, split: bool = False) -> GuidanceResult:
    """Object move / resize guidance (``guidance_move``; docs/methods.md, DragonDiffusion 12).
    ``regions`` is a
    :class:`~dragexp.methods.dragondiffusion.regions.MoveRegions`; the edit gradient acts inside ``mask_cur``;
    ``inpaint=False`` drops the inpainting guidance (contrast + inpaint terms); ``ref_features``
    and ``split`` as in :func:`guidance_drag`."""
    leaves, cur, (ref_features,) = _estimate(estimator, latent, t, up_scale, [ref_features],
                                             split)
    layer_weights = list(layer_weights) if layer_weights is not None else [0.5] * len(ref_features)
    with torch.no_grad():
        ref_org = resize_features(ref_features, up_scale)
        ref_resized = resize_features(ref_features, up_scale, regions.resize_scale)
    if regions.mask_x0_ref is not None:
        ref_region = F.interpolate(regions.mask_x0_ref[None, None], regions.mask_other.shape[-2:]) > 0.5
    else:
        ref_region = regions.mask_other
    with torch.enable_grad():
        e_edit, e_con = _pair(lambda c: move_energies(
            c, ref_org, ref_resized, regions.mask_tar, regions.mask_cur, regions.mask_other,
            regions.mask_non_overlap, ref_region, w_edit, w_content, w_contrast, w_inpaint,
            layer_weights, inpaint), cur)
        mask = (F.interpolate((regions.mask_cur > 0.5).float(), latent.shape[-2:]) > 0).to(latent.dtype)
        return _combine(leaves, e_edit, e_con, energy_scale, True, mask, step)


def _guidance_blend(estimator, latent, ref_base_features, ref_replace_features, t, regions,
                    energy_scale, w_edit, w_content, up_scale, step, pooled,
                    split) -> GuidanceResult:
    leaves, cur, (base_raw, replace_raw) = _estimate(
        estimator, latent, t, up_scale, [ref_base_features, ref_replace_features], split)
    with torch.no_grad():
        ref_base = resize_features(base_raw, up_scale)
        ref_replace = resize_features(replace_raw, up_scale)
    with torch.enable_grad():
        e_edit, e_con = _pair(lambda c: blend_energies(
            c, ref_base, ref_replace, regions.mask_base_cur, regions.mask_replace_cur, w_edit,
            w_content, pooled), cur)
        mask = (F.interpolate(regions.mask_base_cur.float(), latent.shape[-2:]) > 0).to(latent.dtype)
        # e_edit is read from the first leaf, e_con from the second
        return _combine((leaves[1], leaves[0]), e_con, e_edit, energy_scale, False, mask, step)


def guidance_appearance(estimator, latent, ref_base_features, ref_replace_features, t, regions,
                        energy_scale, w_edit, w_content, up_scale=2, step=4e-2,
                        split: bool = False) -> GuidanceResult:
    """Appearance replacement (``guidance_appearance``): the object's *mean* feature against
    the second image's object's mean; content keeps the base image outside the object."""
    return _guidance_blend(estimator, latent, ref_base_features, ref_replace_features, t, regions,
                           energy_scale, w_edit, w_content, up_scale, step, pooled=True,
                           split=split)


def guidance_paste(estimator, latent, ref_base_features, ref_replace_features, t, regions,
                   energy_scale, w_edit, w_content, up_scale=2, step=4e-2,
                   split: bool = False) -> GuidanceResult:
    """Object pasting (``guidance_paste``): per-pixel object similarity to the second image."""
    return _guidance_blend(estimator, latent, ref_base_features, ref_replace_features, t, regions,
                           energy_scale, w_edit, w_content, up_scale, step, pooled=False,
                           split=split)


# -- estimators ----------------------------------------------------------------------------

class _Stop(Exception):
    pass


class DecoderFeatureEstimator:
    """The authors' estimator on our UNet: a plain forward with the prompt only, returning the
    outputs of ``up_blocks[k]`` for ``k`` in ``up_ft_index`` (feature index ``k + 1`` of
    :class:`~dragexp.core.features.FeatureTap`). The forward stops after the last block needed (its
    output is all the energies read), saving the rest of the decoder and its backward.

    Args:
        unet: the UNet (its attention processors may be controlled: ``plain`` is a context in
            which they behave as ordinary attention, e.g. the memory-bank controller's).
        text: prompt embedding (1, 77, D), no image tokens.
        up_ft_index: decoder blocks whose outputs carry the energy.
        plain: context manager factory making the attention plain during the estimator's forward.
    """

    def __init__(self, unet: nn.Module, text: torch.Tensor, up_ft_index: Sequence[int],
                 plain: Callable | None = None):
        self.unet = unet
        self.text = text
        self.up_ft_index = [int(k) for k in up_ft_index]
        self.plain = plain or nullcontext

    def __call__(self, latent: torch.Tensor, t) -> list[torch.Tensor]:
        last = self.unet.up_blocks[max(self.up_ft_index)]

        def stop(_m, _i, _o):
            raise _Stop

        with self.plain(), FeatureTap(self.unet, [k + 1 for k in self.up_ft_index]) as tap:
            handle = last.register_forward_hook(stop)
            try:
                self.unet(latent, t, encoder_hidden_states=self.text.expand(latent.shape[0], -1, -1),
                          return_dict=False)
            except _Stop:
                pass
            finally:
                handle.remove()
        return tap.features
