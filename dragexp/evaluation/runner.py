"""Evaluate results folders on a sample source: the engine behind ``scripts/evaluate.py``.

A *results folder* is anything in the layout community evaluators read,
``<root>/<category>/<sample>/dragged_image.png`` (sample names are ``"<category>/<sample>"``).
:func:`resolve_results` accepts, for each entry:

- a dragexp run folder (``<run>/results/...`` plus ``run_summary.json`` / ``errors.json``);
- a Hydra sweep folder (``job0/``, ``job1/``, ... each a run folder): one entry per job, named by
  the swept values (the ablation's settings);
- a plain results root in the community layout;
- ``do_nothing``: the source image itself as the "edit" (the baseline row of the papers).

Every sample of the source is scored with :func:`~dragexp.evaluation.metrics.score_sample`;
a sample without an edited image (failed or not run) is recorded as missing, with the run's
error message when ``errors.json`` has one, and left out of the means.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.bundle import ModelBundle
from .dift import DiftFeaturizer, GlobalNoise, SeededNoise
from .metrics import METRICS, SampleScore, aggregate, sample_seed, score_sample
from .resize import load_rgb

log = logging.getLogger("dragexp")

__all__ = ["AUTHORS_CATEGORY_ORDER", "ResultsFolder", "FolderEval", "Evaluator",
           "resolve_results", "build_evaluator", "evaluate_from_config", "evaluate_run",
           "PROTOCOL"]

PROTOCOL = "dragbench-dragdiffusion"
"""The protocol of DragDiffusion's ``drag_bench_evaluation`` scripts (commit ebe659a), as
docs/evaluation.md describes it: PIL-bilinear resize of the edit to the source size; MD
with DIFT (SD 2.1, t=261, up_blocks[1], ensemble 8, sampled VAE latent, prompt), global argmax,
pooled over pairs; IF = 1 - LPIPS(alex v0.1) on 224x224 squashed [-1, 1] inputs; CLIP ViT-B/32
image-image cosine. Numbers are comparable with the published tables only with the real models."""

AUTHORS_CATEGORY_ORDER = (
    "art_work", "land_scape", "building_city_view", "building_countryside_view", "animals",
    "human_head", "human_upper_body", "human_full_body", "interior_design", "other_objects",
)
"""The fixed category list both reference scripts walk (``noise="authors"`` visits this order)."""

DO_NOTHING = ("do_nothing", "identity")


@dataclass
class ResultsFolder:
    """One set of edits to evaluate. ``root`` None means "do nothing" (the source is the edit)."""

    label: str
    root: Path | None
    run_dir: Path | None = None
    errors: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def edited_path(self, name: str) -> Path | None:
        return None if self.root is None else self.root / name / "dragged_image.png"

    def attempted(self, names: list[str]) -> list[str]:
        """Of ``names``, those this run edited or recorded as failed: a run over part of the
        benchmark is scored on its part (all names for "do nothing" and for plain folders
        outside a run)."""
        if self.root is None or self.run_dir is None:
            return list(names)
        return [n for n in names if n in self.errors or (self.root / n).is_dir()]


@dataclass
class FolderEval:
    """The evaluation of one results folder."""

    folder: ResultsFolder
    scores: list[SampleScore]
    missing: list[dict]
    protocol: dict
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return self.folder.label

    def overall(self) -> dict:
        a = aggregate(self.scores)
        a.update(n_missing=len(self.missing), seconds_per_sample=(
            self.seconds / len(self.scores) if self.scores else float("nan")))
        return a

    def per_category(self) -> dict[str, dict]:
        cats: dict[str, list[SampleScore]] = {}
        for s in self.scores:
            cats.setdefault(s.category, []).append(s)
        return {c: aggregate(v) for c, v in sorted(cats.items())}


def _run_label(run_dir: Path) -> tuple[str, dict, dict]:
    info, errors = {}, {}
    f = run_dir / "run_summary.json"
    if f.is_file():
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            info = {}
    e = run_dir / "errors.json"
    if e.is_file():
        try:
            errors = {r["name"]: r["error"] for r in json.loads(e.read_text())}
        except (OSError, ValueError, KeyError, TypeError):
            errors = {}
    return str(info.get("method") or run_dir.name), info, errors


def resolve_results(entries, labels=None) -> list[ResultsFolder]:
    """Results folders from paths (run folder, sweep folder, plain root) or ``do_nothing``.

    Raises:
        FileNotFoundError: a path that does not exist, or a folder with nothing to evaluate.
    """
    if isinstance(entries, (str, os.PathLike)):
        entries = [entries]
    out: list[ResultsFolder] = []
    for entry in entries:
        s = str(entry)
        if s in DO_NOTHING:
            out.append(ResultsFolder("do_nothing", None))
            continue
        p = Path(s).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"results folder not found: {s}")
        if (p / "results").is_dir():
            label, info, errors = _run_label(p)
            out.append(ResultsFolder(label, p / "results", p, errors, info))
            continue
        jobs = [d for d in sorted(p.iterdir()) if d.is_dir() and (d / "results").is_dir()]
        if jobs:  # a sweep: name each job by the values that differ between jobs
            from ..reporting.summary import _job_key, collect

            settings = {r["job_dir"]: r["setting"] for r in collect(p)}
            for d in sorted(jobs, key=_job_key):
                label, info, errors = _run_label(d)
                setting = settings.get(str(d))
                out.append(ResultsFolder(f"{label} {setting}" if setting else f"{label} {d.name}",
                                         d / "results", d, errors, info))
            continue
        if any(p.glob("*/*/dragged_image.png")) or any(p.glob("*/dragged_image.png")):
            out.append(ResultsFolder(p.name, p))
            continue
        raise FileNotFoundError(f"{s}: no dragged_image.png below it (expected "
                                "<root>/<category>/<sample>/dragged_image.png, a dragexp run "
                                "folder with results/, or a sweep of such runs)")
    if labels:
        labels = list(labels)
        if len(labels) != len(out):
            raise ValueError(f"{len(labels)} labels for {len(out)} results folders")
        for f, lab in zip(out, labels):
            f.label = str(lab)
    seen: dict[str, int] = {}
    for f in out:  # unique labels
        n = seen.get(f.label, 0)
        seen[f.label] = n + 1
        if n:
            f.label = f"{f.label} ({n + 1})"
    return out


def authors_order(names: list[str], root: Path | None) -> list[str]:
    """The order the reference visits samples: its category list, then ``os.listdir``."""
    if root is None:
        return list(names)
    rank = {c: i for i, c in enumerate(AUTHORS_CATEGORY_ORDER)}
    listed: dict[str, dict[str, int]] = {}
    for n in names:
        cat = n.split("/", 1)[0]
        if cat not in listed:
            try:
                listed[cat] = {s: i for i, s in enumerate(os.listdir(Path(root) / cat))}
            except OSError:
                listed[cat] = {}
    def key(n):
        cat, _, s = n.partition("/")
        return (rank.get(cat, len(rank)), cat, listed[cat].get(s, 10**9), s)
    return sorted(names, key=key)


class Evaluator:
    """Scores results folders on one sample source with fixed models and settings.

    Args:
        featurizer: DIFT (or a stand-in), None to skip MD.
        lpips_net: LPIPS network, None to skip LPIPS / IF.
        clip_model: CLIP model, None to skip CLIP similarity.
        noise: ``"per_sample"`` (default; seeds from :func:`~.metrics.sample_seed`) or
            ``"authors"`` (one global seed per folder, the reference's visiting order).
        seed: the base seed (42, the reference's ``seed_everything(42)``).
        progress: show a progress bar.
    """

    def __init__(self, featurizer=None, lpips_net=None, clip_model=None,
                 noise: str = "per_sample", seed: int = 42, progress: bool = True):
        if noise not in ("per_sample", "authors"):
            raise ValueError(f"eval.noise must be 'per_sample' or 'authors', got {noise!r}")
        self.featurizer, self.lpips_net, self.clip_model = featurizer, lpips_net, clip_model
        self.noise, self.seed, self.progress = noise, int(seed), bool(progress)
        self._source_ft: dict[tuple, torch.Tensor] = {}
        self.max_cached = 512  # source DIFT maps kept (1/16 resolution; ~9 MB each for SD 2.1)

    def protocol(self) -> dict:
        """What produced the numbers: the protocol name, the models, the noise, comparability."""
        f = self.featurizer
        name = PROTOCOL if (f is None or getattr(f, "kind", "dift") == "dift") else \
            "exact-position-diagnostic"
        changed = [f"{k}={getattr(f, k)}" for k, v in (("t", 261), ("up_ft_index", 1),
                                                       ("ensemble_size", 8))
                   if name == PROTOCOL and f is not None and getattr(f, k, v) != v]
        if changed:  # not the published settings: say so in the protocol's name
            name = f"{PROTOCOL} (modified: {', '.join(changed)})"
        dift = getattr(f, "description", None) if f is not None else None
        lp = getattr(self.lpips_net, "description", None)
        cl = getattr(self.clip_model, "description", None)
        src = getattr(getattr(f, "models", None), "source", "") or ""
        real_dift = name == PROTOCOL and f is not None and ("hub:" in src or "local:" in src)
        comparable = dict(
            md=bool(real_dift), if_=lp == "LPIPS-alex v0.1",
            clip=bool(cl) and "OpenAI" in cl)
        return dict(name=name, dift=dift, lpips=lp, clip=cl,
                    noise=f"{self.noise}(seed={self.seed})", comparable_to_published=comparable)

    def _noises(self, name: str, global_noise):
        if self.noise == "authors":
            return global_noise, global_noise
        return (SeededNoise(sample_seed(self.seed, name, "source")),
                SeededNoise(sample_seed(self.seed, name, "edited")))

    def evaluate(self, samples, folder: ResultsFolder, names: list[str] | None = None) -> FolderEval:
        """Score every sample of ``samples`` (or only ``names``) against ``folder``'s edits."""
        from tqdm.auto import tqdm

        index = {n: i for i, n in enumerate(samples.names)}
        names = list(samples.names) if names is None else [n for n in names if n in index]
        global_noise = None
        if self.noise == "authors":
            names = authors_order(names, getattr(samples, "root", None))
            dev = getattr(self.featurizer, "device", torch.device("cpu"))
            torch.manual_seed(self.seed)  # seed_everything(42), once per results folder
            if dev.type == "cuda":
                torch.cuda.manual_seed_all(self.seed)
            global_noise = GlobalNoise()
        scores, missing = [], []
        t0 = time.perf_counter()
        for name in tqdm(names, desc=f"eval {folder.label}", disable=not self.progress):
            path = folder.edited_path(name)
            if path is not None and not path.is_file():
                why = folder.errors.get(name) or f"no {path.name} in {path.parent}"
                missing.append(dict(name=name, reason=why))
                continue
            try:
                sample = samples[index[name]]
            except Exception as exc:  # noqa: BLE001 - a bad sample is recorded, the rest goes on
                missing.append(dict(name=name, reason=f"{type(exc).__name__}: {exc}"))
                continue
            edited = sample.image if path is None else load_rgb(path)
            s_noise, e_noise = self._noises(name, global_noise)
            # The source's features are the same for every results folder (same image, prompt
            # and per-sample noise): computed once, keyed by content, not only by name.
            key = (name, hashlib.sha1(sample.image.tobytes()).hexdigest(), sample.image.shape,
                   str(sample.prompt))
            cached = self._source_ft.get(key) if self.noise == "per_sample" else None
            sc = score_sample(sample.image, edited, sample.points, sample.prompt,
                              self.featurizer, self.lpips_net, self.clip_model,
                              source_noise=s_noise, edited_noise=e_noise, source_ft=cached,
                              name=name, category=sample.category or name.split("/")[0])
            ft = sc.extra.pop("ft_source", None)
            if self.noise == "per_sample" and ft is not None and cached is None:
                if len(self._source_ft) >= self.max_cached:
                    self._source_ft.pop(next(iter(self._source_ft)))
                self._source_ft[key] = ft.cpu()
            scores.append(sc)
        return FolderEval(folder, scores, missing, self.protocol(), time.perf_counter() - t0)


# ------------------------------------------------------------------------------ from config

_EVALUATOR_CACHE: dict[str, Evaluator] = {}


def _device(name) -> torch.device:
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(name))


def build_evaluator(ecfg, progress: bool = True) -> Evaluator:
    """An :class:`Evaluator` from the ``eval`` config group (models built once per process)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    key = OmegaConf.to_yaml(ecfg)
    if key in _EVALUATOR_CACHE:
        ev = _EVALUATOR_CACHE[key]
        ev.progress = progress
        return ev
    metrics = [str(m) for m in ecfg.metrics]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"eval.metrics: unknown {unknown}; choose from {list(METRICS)}")
    device = _device(ecfg.get("device", "auto"))
    featurizer = lpips_net = clip_model = None
    if "md" in metrics:
        obj = instantiate(ecfg.dift)
        if isinstance(obj, ModelBundle):
            obj = DiftFeaturizer(obj.to(device, torch.float32), t=ecfg.t,
                                 up_ft_index=ecfg.up_ft_index, ensemble_size=ecfg.ensemble_size,
                                 attention_slicing=ecfg.get("attention_slicing"))
        featurizer = obj
    if "if" in metrics:
        lpips_net = instantiate(ecfg.lpips).to(device)
    if "clip" in metrics:
        clip_model = instantiate(ecfg.clip).to(device)
    ev = Evaluator(featurizer, lpips_net, clip_model, noise=str(ecfg.noise), seed=int(ecfg.seed),
                   progress=progress)
    _EVALUATOR_CACHE.clear()
    _EVALUATOR_CACHE[key] = ev
    return ev


def build_data(data_cfg):
    """The sample source of a ``data`` config; ``shard`` / ``num_shards`` (a run's split of
    the work) are dropped: evaluation reads every sample."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(data_cfg, resolve=True)
    d.pop("shard", None)
    d.pop("num_shards", None)
    return instantiate(d)


def evaluate_from_config(cfg, out_dir: str | Path) -> list[FolderEval]:
    """``scripts/evaluate.py``: evaluate ``cfg.results`` on ``cfg.data``, write the report."""
    from omegaconf import OmegaConf

    from .report import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = cfg.results
    entries = OmegaConf.to_container(results) if OmegaConf.is_list(results) else [results]
    folders = resolve_results(entries, cfg.get("labels"))
    samples = build_data(cfg.data)
    ev = build_evaluator(cfg.eval, progress=bool(cfg.get("progress", True)))
    evals = []
    for f in folders:
        names = f.attempted(list(samples.names))
        part = "" if len(names) == len(samples.names) else \
            f": the {len(names)} of the benchmark's {len(samples.names)} samples this run has"
        log.info("evaluating %s (%s)%s", f.label, f.root or "source images", part)
        evals.append(ev.evaluate(samples, f, names))
    run = None
    if cfg.logger.get("enabled"):
        from ..reporting.wandb_run import ExperimentLog

        wb = ExperimentLog(**dict(cfg.logger), config=OmegaConf.to_container(cfg, resolve=True))
        run = wb.run
    write_report(evals, out_dir, wandb_run=run)
    if run is not None:
        run.finish()
    return evals


def evaluate_run(cfg, out_dir: str | Path, samples, names: list[str] | None = None,
                 wandb_run=None) -> dict:
    """Evaluate a run's own results at the end of the run (``evaluate=true``).

    Args:
        cfg: the run's config (``eval`` group, ``method.name``).
        out_dir: the run folder (``results/`` inside).
        samples: the run's sample source; ``names``: only these (a shard's samples).
        wandb_run: the run's W&B run, if any (tables and summary are logged into it).

    Writes ``<out>/evaluation/`` and returns ``eval_*`` numbers for ``run_summary.json``.
    """
    from .report import write_report

    out_dir = Path(out_dir)
    folder = ResultsFolder(str(cfg.method.get("name", "run")), out_dir / "results", out_dir)
    _, _, folder.errors = _run_label(out_dir)
    ev = build_evaluator(cfg.eval, progress=bool(cfg.get("progress", False)))
    fe = ev.evaluate(samples, folder, names)
    write_report([fe], out_dir / "evaluation", wandb_run=wandb_run)
    o = fe.overall()
    return dict(eval_md=o["md"], eval_if=o["if_"], eval_clip_sim=o["clip_sim"],
                eval_n_samples=o["n_samples"], eval_n_missing=o["n_missing"],
                eval_protocol=fe.protocol["name"])
