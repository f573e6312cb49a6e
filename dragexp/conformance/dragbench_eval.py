"""Adapters for the DragBench evaluation cases: ``dragbench_eval.metrics`` and ``.dift_features``.

Both build the stored tiny models named in ``case.json["models"]`` (DIFT UNet + VAE by the
README's one rule, LPIPS from ``lpips.safetensors``, CLIP from ``clip.safetensors``), replay the
stored noise (int8 ``q``, value ``q / 32``) and the stored prompt embeddings, and call the
evaluation's own functions (:func:`dragexp.evaluation.metrics.score_sample`,
:func:`~dragexp.evaluation.metrics.aggregate`, :func:`~dragexp.evaluation.dift.dift_features`,
:func:`~dragexp.evaluation.matching.upsample`). See docs/evaluation.md; the case format is in
../shared/conformance/README_dragbench_eval.md, beside the case folders.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..evaluation.clip_sim import build_clip
from ..evaluation.dift import DiftFeaturizer, StoredNoise, load_dift_case_models
from ..evaluation.lpips_if import build_lpips, chstats
from ..evaluation.matching import upsample
from ..evaluation.metrics import aggregate, score_sample
from ..evaluation.resize import load_rgb, to_signed_unit
from .case import Case, CaseError
from .registry import adapter


def _q(t: torch.Tensor) -> torch.Tensor:
    return t.float() / 32


def _featurizer(case: Case) -> DiftFeaturizer:
    models = load_dift_case_models(case.path)
    p = case.meta.get("parameters", {})
    # the reference enables sliced attention; same maths, and the same rounding as recorded
    slicing = p.get("enable_attention_slicing", {}).get("value", "auto")
    return DiftFeaturizer(models, t=int(case.param("t", 261)),
                          up_ft_index=int(case.param("up_ft_index", 1)),
                          ensemble_size=int(case.param("ensemble_size", 8)),
                          attention_slicing=slicing if slicing else None)


def _f64(x) -> torch.Tensor:
    return torch.tensor([float(x)], dtype=torch.float64)


@adapter("dragbench_eval.metrics")
def metrics(case: Case) -> dict[str, torch.Tensor]:
    dift = _featurizer(case)
    lp = build_lpips("state_dict", str(case.path / "lpips.safetensors"))
    clip = build_clip("file", str(case.path / "clip.safetensors"))
    ids = sorted({int(m.group(1)) for k in case.inputs for m in [re.match(r"s(\d+)_points_xy$", k)] if m})
    if not ids:
        raise CaseError(f"{case.path}: no s<i>_points_xy inputs")
    out: dict[str, torch.Tensor] = {}
    scores = []
    for i in ids:
        s = f"s{i}_"
        src = load_rgb(case.path / f"{s}original_image.png")
        drg = load_rgb(case.path / f"{s}dragged_image.png")
        inp = case.inputs
        sc = score_sample(
            src, drg, inp[f"{s}points_xy"].tolist(), inp[f"{s}prompt_embeds"].float(),
            dift, lp, clip,
            source_noise=StoredNoise([_q(inp[f"{s}src_vae_eps_q"]), _q(inp[f"{s}src_noise_q"])]),
            edited_noise=StoredNoise([_q(inp[f"{s}drg_vae_eps_q"]), _q(inp[f"{s}drg_noise_q"])]),
            keep=True, name=f"s{i}")
        scores.append(sc)
        m, e = sc.matches, sc.extra
        out.update({
            f"{s}ft_source": e["ft_source"], f"{s}ft_dragged": e["ft_edited"],
            f"{s}src_vec": m.src_vec, f"{s}match_rc": m.match_rc, f"{s}match_xy": m.match_xy,
            f"{s}cos_max": m.cos_max, f"{s}cos_gap_diag": m.cos_gap, f"{s}cos_ties_diag": m.ties,
            f"{s}dist": sc.dist, f"{s}md_sum": _f64(sc.dist.double().sum()),
            f"{s}md_mean": _f64(sc.md_mean),
            f"{s}lpips": sc.lpips.reshape(1), f"{s}if": _f64(sc.if_),
            f"{s}lpips_input224_source_chstats": chstats(e["lpips_input_source"]),
            f"{s}lpips_input224_dragged_chstats": chstats(e["lpips_input_edited"]),
            f"{s}clip_input_source_chstats": chstats(e["clip_input_source"]),
            f"{s}clip_input_dragged_chstats": chstats(e["clip_input_edited"]),
            f"{s}clip_feat_source": e["clip_feat_source"],
            f"{s}clip_feat_dragged": e["clip_feat_edited"],
            f"{s}clip_sim": sc.clip_sim.reshape(1),
        })
        if f"{s}expected_dragged_resized.png" in case.expected_keys():
            out[f"{s}expected_dragged_resized.png"] = torch.from_numpy(np.ascontiguousarray(
                e["edited_resized"]))
    agg = aggregate(scores)
    out.update(md=_f64(agg["md"]), lpips_mean=_f64(agg["lpips"]), if_mean=_f64(agg["if_"]),
               clip_sim_mean=_f64(agg["clip_sim"]))
    return out


@adapter("dragbench_eval.dift_features")
def dift_features(case: Case) -> dict[str, torch.Tensor]:
    dift = _featurizer(case)
    inp = case.inputs
    image = inp["image"].numpy()
    record: dict = {}
    noise = StoredNoise([_q(inp["vae_eps_q"]), _q(inp["noise_q"])])
    ft = dift(image, inp["prompt_embeds"].float(), noise, record=record)
    H, W = image.shape[:2]
    up = upsample(ft, (H, W))[0]  # [C, H, W]
    probes = inp["probe_rc"].long()
    r, c = [int(v) for v in inp["probe_row_col"].tolist()]
    x = to_signed_unit(image)[0].double()
    out = {k: record[k] for k in ("vae_mean", "vae_std", "latents", "latents_noisy",
                                  "sqrt_alpha_prod", "sqrt_one_minus_alpha_prod", "up_ft_members")}
    out.update(
        ft=ft,
        image_tensor_chstats=torch.stack([x.mean(dim=(1, 2)), x.std(dim=(1, 2))]),
        ft_up_probes=up[:, probes[:, 0], probes[:, 1]].T.contiguous(),
        ft_up_row=up[:, r, :].contiguous(),
        ft_up_col=up[:, :, c].contiguous(),
        ft_up_channel_mean=up.double().mean(dim=(1, 2)),
        ft_up_channel_sumsq=(up.double() ** 2).sum(dim=(1, 2)),
    )
    return out
