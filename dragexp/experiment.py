"""Run one configured job: a method over a data source, results on disk and in W&B.

This is what ``scripts/train.py`` calls with the composed Hydra config. It knows the config's
*shape* (model, data, method, callbacks, trainer, logger groups) but builds every object by
``hydra.utils.instantiate``, so the classes themselves know nothing of Hydra.

A sample that fails (bad input, a border the reference cannot handle) is recorded in
``errors.json`` with its message and the run goes on; samples already written stay written,
and a sample whose results exist is not redone (``resume``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .data.sample import SampleError
from .drag.trackers import BorderError
from .methods.base import EditContext
from .performance.speed import SpeedSettings, apply_to_models
from .reporting.results import is_done, write_json_atomic, write_result
from .reporting.wandb_run import ExperimentLog

log = logging.getLogger("dragexp")

_MODEL_CACHE: dict[str, object] = {}


def load_models(model_cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    """Build the model bundle once per process and reuse it for every job and sample."""
    key = OmegaConf.to_yaml(model_cfg) + f"|{device}|{dtype}"
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        bundle = instantiate(model_cfg)
        _MODEL_CACHE[key] = bundle.to(device, dtype)
    return _MODEL_CACHE[key]


def resolve_precision(requested: str, device: torch.device) -> tuple[str, torch.dtype]:
    """(Lightning precision, base-weight dtype). fp32 on CPU (docs/methods.md, Framework 4)."""
    requested = str(requested)
    if device.type != "cuda":
        if requested not in ("32", "32-true"):
            log.warning("precision %s (trainer.precision or speed.precision) needs a GPU; "
                        "running fp32 on %s", requested, device)
        return "32-true", torch.float32
    if requested == "16-mixed":
        return requested, torch.float16
    if requested == "bf16-mixed":
        return requested, torch.bfloat16
    return requested, torch.float32


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_drag_callbacks(cfg: DictConfig) -> list:
    """Fresh callbacks for one drag problem, from the ``callbacks`` group (skips nulls)."""
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def run(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run the configured method over the configured data; returns the run summary."""
    check_required(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(cfg.seed))
    device = pick_device(cfg.trainer.get("device", "auto"))
    speed = SpeedSettings.from_config(cfg.get("speed"))
    precision, dtype = resolve_precision(speed.precision or cfg.trainer.precision, device)
    method = instantiate(cfg.method)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    shard, num_shards = int(data_cfg.pop("shard", 0)), int(data_cfg.pop("num_shards", 1))
    if not 0 <= shard < num_shards:
        raise ValueError(f"data.shard={shard} must be in 0..data.num_shards-1={num_shards - 1}")
    data = instantiate(data_cfg)
    t0 = time.perf_counter()
    models = apply_to_models(load_models(cfg.model, device, dtype), speed)
    load_s = time.perf_counter() - t0
    lora_dir = Path(cfg.paths.lora_cache)
    results_dir = out_dir / "results"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    wb = ExperimentLog(**dict(cfg.logger), config=resolved) if cfg.logger.get("enabled") else \
        ExperimentLog(enabled=False)

    _remove_partial(results_dir)
    rows, errors = [], []
    started = time.time()
    indices = shard_indices(len(data), shard, num_shards)
    from tqdm.auto import tqdm

    skipped: list[str] = []
    for index, name, sample, error in tqdm(iter_samples(data, indices), total=len(indices),
                                           desc="samples", disable=not cfg.progress):
        if error is None and cfg.resume and is_done(results_dir, name):
            rows.append(json.loads((results_dir / name / "result.json").read_text()))
            skipped.append(name)
            continue
        if error is None and not sample.has_mask:
            log.info("sample %s: the mask is empty (all black): %s edits it as 'no mask drawn', "
                     "what its authors do without a mask", name, method.name)
        if error is None:
            try:
                torch.manual_seed(int(cfg.seed))
                result = method.edit(sample, models, EditContext(
                    build_drag_callbacks(cfg), lora_dir=lora_dir, precision=precision,
                    progress=bool(cfg.progress), speed=speed))
                folder = write_result(results_dir, sample, result,
                                      extra=dict(method=method.name, model=models.source))
                info = json.loads((folder / "result.json").read_text())
                rows.append(info)
                wb.log_sample(index, name, {
                    "edited": result.image,
                    "source_annotated": str(folder / "source_annotated.png"),
                    **(result.extras or {}).get("images", {}),   # e.g. the auto-mask sequence
                }, _metrics(info), result.trajectory_xy, result.losses)
                continue
            except (SampleError, BorderError, ValueError) as exc:
                error = exc
            except Exception as exc:  # keep what is done; report everything else loudly
                error = exc
                log.error("sample %s failed:\n%s", name, traceback.format_exc())
        msg = f"{type(error).__name__}: {error}"
        log.error("sample %s failed: %s", name, msg)
        errors.append(dict(name=name, error=msg))
        wb.log_error(index, name, msg)

    summary = summarise(rows, errors, method.name, models.source, load_s)
    summary.update(overrides=_job_overrides(), shard=shard, num_shards=num_shards,
                   started=started, finished=time.time(),
                   cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    write_json_atomic(out_dir / "errors.json", errors)
    if cfg.get("evaluate"):  # DragBench metrics of this run's results (dragexp.evaluation)
        from .evaluation.runner import evaluate_run

        summary.update(evaluate_run(cfg, out_dir, data, [data.names[i] for i in indices]
                                    if hasattr(data, "names") else None, wandb_run=wb.run))
    write_json_atomic(out_dir / "run_summary.json", dict(summary, samples=rows))
    wb.finish({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    if skipped:
        log.info("skipping %d finished samples (resume=true; resume=false redoes them)%s",
                 len(skipped), ": " + ", ".join(skipped) if log.isEnabledFor(logging.DEBUG) else "")
    log.info("done: %d edited (%d in this run, %d finished before), %d failed, results in %s",
             summary["num_done"], summary["num_done"] - len(skipped), len(skipped),
             summary["num_failed"], results_dir)
    if errors:
        total = len(errors) + len(rows)
        log.warning("%d of %d samples failed, see %s; the first: %s: %s", len(errors), total,
                    out_dir / "errors.json", errors[0]["name"], errors[0]["error"])
        if not rows:
            raise RunFailed(f"no sample succeeded: all {len(errors)} failed (see "
                            f"{out_dir / 'errors.json'}); the first, {errors[0]['name']}: "
                            f"{errors[0]['error']}")
    return summary


class RunError(RuntimeError):
    """A run that cannot start or that produced nothing; ``scripts/train.py`` prints its one
    line and exits non-zero."""


class RunFailed(RunError):
    """Raised after a run whose every sample failed; the summary and errors.json are written."""


def check_required(cfg: DictConfig) -> None:
    """Mandatory values (``???``) of the model and data groups, named with what to pass."""
    hints = {
        "data.root": "pass data.root=/path/to/DragBench (or your folder of edits), or try it on "
                     "built-in samples with data=toybench (ground truth) or data=samples",
        "model.path": "pass model.path=/path/to/model (a diffusers folder or checkpoint), or use "
                      "the built-in model=toy",
    }
    for group in ("data", "model"):
        node = cfg.get(group)
        if node is None:
            continue
        for key in node:
            if OmegaConf.is_missing(node, key):
                name = f"{group}.{key}"
                raise RunError(f"{name} is not set ({group}={_choice(group)}): "
                               + hints.get(name, f"pass {name}=..."))


def _choice(group: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group))
    except Exception:
        return "?"


def _remove_partial(results_dir: Path) -> None:
    """Drop temporary sample folders a killed run left behind (complete ones were renamed)."""
    import shutil

    if results_dir.is_dir():
        for tmp in results_dir.rglob(".*.*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)


def shard_indices(n: int, shard: int = 0, num_shards: int = 1) -> list[int]:
    """Sample indices of one shard: every ``num_shards``-th sample of the sorted list."""
    return list(range(shard, n, num_shards))


def iter_samples(data, indices: list[int]):
    """(index, name, sample, error) for the chosen samples; loading errors are yielded, not raised."""
    names = list(data.names) if hasattr(data, "names") else None
    for i in indices:
        try:
            sample = data[i]
            yield i, sample.name, sample, None
        except SampleError as exc:
            yield i, names[i] if names else f"#{i}", None, exc


def _metrics(info: dict) -> dict:
    m = {k: info[k] for k in ("num_steps", "final_distance_px", "initial_distance_px")}
    m["stopped_early"] = int(bool(info["stopped_early"]))
    m.update({f"seconds_{k}": v for k, v in info["timings"].items()})
    return m


def summarise(rows: list[dict], errors: list[dict], method: str, model: str, load_s: float) -> dict:
    def mean(key):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        return sum(vals) / len(vals) if vals else float("nan")

    stages = sorted({k for r in rows for k in r.get("timings", {})})
    out = dict(method=method, model=model, num_done=len(rows), num_failed=len(errors),
               mean_final_distance_px=mean("final_distance_px"),
               mean_initial_distance_px=mean("initial_distance_px"),
               mean_num_steps=mean("num_steps"),
               reached_fraction=(sum(bool(r.get("stopped_early")) for r in rows) / len(rows)
                                 if rows else float("nan")),
               seconds_model_load=load_s)
    for s in stages:
        vals = [r["timings"][s] for r in rows if s in r.get("timings", {})]
        out[f"seconds_{s}"] = sum(vals) / len(vals)
    out.update(ground_truth_means(rows))
    return out


def ground_truth_means(rows: list[dict]) -> dict:
    """Means of the toybench ground-truth metrics over the samples that have them:
    ``gt_<metric>`` for the edits and ``gt_noedit_<metric>`` for their unedited sources."""
    from .evaluation.ground_truth import METRICS

    scored = [r["ground_truth"] for r in rows if r.get("ground_truth")]
    if not scored:
        return {}
    out = {"gt_num_samples": len(scored)}
    for which, prefix in (("edited", "gt_"), ("no_edit", "gt_noedit_")):
        for m in METRICS:
            vals = [g[which][m] for g in scored if isinstance(g[which].get(m), (int, float))
                    and not math.isnan(g[which][m])]
            out[prefix + m] = sum(vals) / len(vals) if vals else float("nan")
    return out


def _job_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:
        return []
