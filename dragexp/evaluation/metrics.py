"""One sample's DragBench scores, and their aggregation: the one implementation of the arithmetic.

``scripts/evaluate.py`` (through :mod:`dragexp.evaluation.runner`) and the conformance adapters
(:mod:`dragexp.conformance.dragbench_eval`) both call :func:`score_sample` and
:func:`aggregate`; nothing else computes MD, LPIPS / IF or CLIP similarity.

Randomness (docs/evaluation.md section 5, "Randomness"). Each DIFT call draws two
standard-normal tensors. The authors seeded the global RNG once per results folder and let the
draws run on, so an image's noise depended on every image before it and on ``os.listdir``
order. Here, by default (``noise="per_sample"``), every call has its own generator seeded by
:func:`sample_seed` from the base seed, the sample's name and the call's role (``"source"`` /
``"edited"``): the noise of a sample is the same whatever else is evaluated, in whatever
order, on whatever device (drawn on the CPU); the source features are shared by every
results folder compared in one run, and the edited images of all folders get the same draws
(common random numbers), so a difference between methods is not a difference of noise.
``noise="authors"`` reproduces the old behaviour (one
``torch.manual_seed(seed)`` per results folder, the authors' category list and ``os.listdir``
order, draws from the global RNG of the evaluation device).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .clip_sim import clip_similarity
from .lpips_if import lpips_distance
from .matching import Matches, match_handles, pair_distances, points_rc, upsample
from .resize import resize_to_source

__all__ = ["sample_seed", "SampleScore", "score_sample", "aggregate", "METRICS"]

METRICS = ("md", "if", "clip")


def sample_seed(base_seed: int, name: str, role: str) -> int:
    """The seed of one DIFT call: the first 8 bytes (little endian, top bit cleared) of
    ``sha256(f"{base_seed}/{name}/{role}")``; ``role`` is ``"source"`` or ``"edited"``.

    A pure function of the text, so it is the same on every machine and Python version
    (Python's own ``hash`` of a string is salted per process).
    """
    digest = hashlib.sha256(f"{int(base_seed)}/{name}/{role}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class SampleScore:
    """The scores of one edited sample (docs/evaluation.md sections 2-4).

    Attributes:
        dist: float32 ``(K,)`` distance of each pair, source pixels (NaN-free).
        matches: the matching details (``None`` if MD was not computed).
        lpips: float32 scalar LPIPS (NaN if not computed); ``if_ = 1 - lpips``.
        clip_sim: float32 scalar CLIP similarity (NaN if not computed).
        seconds: wall time per stage.
        extra: intermediates kept on request (features, model inputs), for the conformance
            adapter and debugging.
    """

    name: str
    category: str
    dist: torch.Tensor
    matches: Matches | None
    lpips: torch.Tensor
    clip_sim: torch.Tensor
    seconds: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return int(self.dist.numel())

    @property
    def if_(self) -> float:
        return 1.0 - float(self.lpips)

    @property
    def md_mean(self) -> float:
        return float(self.dist.double().mean()) if self.n_pairs else float("nan")

    def row(self) -> dict:
        """Plain values for tables (per-sample CSV/JSON)."""
        r = dict(name=self.name, category=self.category, n_pairs=self.n_pairs,
                 md_sample_mean=self.md_mean, md_sum=float(self.dist.double().sum()),
                 lpips=float(self.lpips), if_=self.if_, clip_sim=float(self.clip_sim))
        if self.matches is not None:
            r["dist"] = [float(d) for d in self.dist]
            r["match_xy"] = self.matches.match_xy.tolist()
        r["seconds"] = round(sum(self.seconds.values()), 4)
        return r


def score_sample(source: np.ndarray, edited: np.ndarray, points_xy, prompt,
                 featurizer=None, lpips_net=None, clip_model=None, *, source_noise=None,
                 edited_noise=None, source_ft: torch.Tensor | None = None, name: str = "",
                 category: str = "", keep: bool = False) -> SampleScore:
    """Score one edit as the reference scripts do (docs/evaluation.md sections 1-4).

    Args:
        source: ``uint8 (H, W, 3)`` source image.
        edited: ``uint8 (h, w, 3)`` edited image (any size; resized to ``(H, W)`` with PIL
            bilinear first, section 1 "First step").
        points_xy: ``[[x, y], ...]`` handle, target, ... in source pixels.
        prompt: the sample's prompt (a string, or an embedding ``[1, L, D]``).
        featurizer: ``featurizer(image_u8, prompt, noise) -> [1, C, h, w]``
            (:class:`~dragexp.evaluation.dift.DiftFeaturizer` or a stand-in); None skips MD.
        lpips_net: an LPIPS network; None skips LPIPS / IF.
        clip_model: an OpenAI-layout CLIP model; None skips CLIP.
        source_noise, edited_noise: the noise sources of the two DIFT calls (the source call
            runs first, as in the script; they may be the same object).
        source_ft: the source's native-resolution DIFT map if already computed (its noise is
            then not drawn).
        keep: keep intermediates in ``extra`` (``ft_source``, ``ft_edited``, ``edited_resized``,
            model inputs).

    Returns:
        :class:`SampleScore`.
    """
    H, W = source.shape[:2]
    seconds: dict[str, float] = {}
    extra: dict = {}
    t0 = time.perf_counter()
    edited_r = resize_to_source(edited, (H, W))
    if keep:
        extra["edited_resized"] = edited_r
    nan = torch.tensor(float("nan"), dtype=torch.float32)
    dist, matches = torch.zeros(0), None
    if featurizer is not None:
        handles, targets = points_rc(points_xy)
        t1 = time.perf_counter()
        ft_s = source_ft if source_ft is not None else featurizer(source, prompt, source_noise)
        ft_e = featurizer(edited_r, prompt, edited_noise)
        seconds["dift"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        src_up = upsample(ft_s, (H, W))
        drg_up = upsample(ft_e, (H, W))
        matches = match_handles(src_up, drg_up, handles, diagnostics=keep)
        del src_up, drg_up
        dist = pair_distances(targets, matches.match_rc)
        seconds["matching"] = time.perf_counter() - t1
        extra["ft_source"] = ft_s  # callers may cache it (cheap: 1/16 resolution)
        if keep:
            extra["ft_edited"] = ft_e
    lp = cs = nan
    if lpips_net is not None:
        lp, rec = _timed_metric(lpips_distance, lpips_net, source, edited_r, seconds, "lpips",
                                keep)
        if keep:
            extra["lpips_input_source"], extra["lpips_input_edited"] = rec["source"], rec["edited"]
    if clip_model is not None:
        cs, rec = _timed_metric(clip_similarity, clip_model, source, edited_r, seconds, "clip",
                                keep)
        if keep:
            extra.update({f"clip_{k}": v for k, v in rec.items()})
    seconds["total"] = time.perf_counter() - t0
    return SampleScore(name=name, category=category, dist=dist.float(), matches=matches,
                       lpips=lp, clip_sim=cs, seconds=seconds, extra=extra)


def _timed_metric(metric, net, source, edited, seconds: dict, key: str, keep: bool):
    """``metric(net, source, edited, record)`` timed into ``seconds[key]``: (value, record)."""
    record = {} if keep else None
    t0 = time.perf_counter()
    value = metric(net, source, edited, record)
    seconds[key] = time.perf_counter() - t0
    return value, record


def aggregate(scores: list[SampleScore]) -> dict:
    """The benchmark numbers over samples, as the scripts print them.

    - ``md``: mean over all *pairs* of all samples (float32 ``torch.tensor(all_dist).mean()``);
    - ``lpips``: ``np.mean`` (float64) of the per-sample float32 LPIPS; ``if_ = 1 - lpips``;
    - ``clip_sim``: ``np.mean`` of the per-sample float32 similarities (float32, as printed).

    Samples where a metric was not computed (NaN) are left out of that metric's mean.
    """
    dists = [s.dist for s in scores if s.n_pairs]
    md = float(torch.cat(dists).float().mean()) if dists else float("nan")
    lp = [float(s.lpips) for s in scores if not np.isnan(float(s.lpips))]
    cs = [np.float32(s.clip_sim) for s in scores if not np.isnan(float(s.clip_sim))]
    lpips_mean = float(np.mean(lp)) if lp else float("nan")
    return dict(md=md, if_=1.0 - lpips_mean, lpips=lpips_mean,
                clip_sim=float(np.mean(cs)) if cs else float("nan"),
                n_samples=len(scores), n_pairs=int(sum(s.n_pairs for s in scores)))
