"""Per-stage benchmark of one edit, the ``faithful`` and ``fast`` settings side by side
(``scripts/bench.py`` runs :func:`main`; measured figures: docs/benchmarks/README.md).

    python scripts/bench.py method=dragdiffusion model=sd15_random
    python scripts/bench.py method=dragdiffusion,dragnoise,easydrag,dragondiffusion model=sd15_random
    python scripts/bench.py method=dragnoise bench.quick=true          # CPU, tiny model, < 1 min

Any ``configs/train.yaml`` override works (``model=local model.path=...``, ``data=dragbench``,
``method.n_pix_step=40``, ...). Options of the benchmark itself:

* ``bench.settings=faithful,fast``: speed settings (``configs/speed/``) to run, in order.
  ``faithful`` runs at the authors' precision: fp16 autocast with fp16 weights on CUDA
  (``16-mixed``), fp32 on the CPU.
* ``bench.warmup=auto``: one untimed pass per setting before the timed one (auto: on CUDA,
  where the first pass pays for kernel selection and allocator growth).
* ``bench.flops=auto``: where FLOPs are counted: ``separate`` (on the warm-up pass, or an
  extra pass), ``timed`` (on the timed pass: cheaper, but the counter's per-op overhead is
  then in the seconds), ``off``. auto: ``timed`` for a quick CPU run, else ``separate``.
* ``bench.quick=false``: a smoke run: LoRA steps capped at 5, drag steps at 10, a 20-step
  DDIM schedule for the latent-optimising methods and EasyDrag, half the schedule for
  DragonDiffusion (25 of 50 steps, 15 guided); per-step figures stay comparable, totals do
  not. Each method's quick run on the tiny model finishes in under a minute on a CPU.
* ``bench.json=PATH``: where the JSON goes (default ``<hydra.run.dir>/bench_<time>.json`` when
  ``hydra.run.dir=`` is given, else ``outputs/bench/bench_<time>.json``); its path is the
  last line printed.

For each method and setting it prints one row per stage (model load, LoRA, encode, inversion,
optimisation, denoising / sampling, decode, total): seconds, FLOPs in UNet forward-equivalents
(one batch-1 forward at the working size; a backward counts about two), achieved TFLOP/s and
its share of the device's peak (datasheet peak on NVIDIA GPUs, the measured fp32
matrix-product rate on a CPU), kernel launches (dispatched ops that run a kernel) and what
they would cost at the price of one launch of the plain forward (an eager GPU edit at 512 px
costs about that: see ``dragexp.performance.profiling``), and peak memory (CUDA: allocated during the
stage; CPU: the process's peak resident size so far). Above each table: the plain forward's
launches by op (which ops a fusion or a compiled graph would have to remove). Then the
faithful/fast time ratio per stage and the difference of the two edited images (max pixel
difference, LPIPS when the AlexNet weights are on disk). The same figures go to the JSON file.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# the repository (configs/, outputs/) of this editable install
ROOT = Path(__file__).resolve().parents[2]

STAGE_ORDER = ["model load", "lora", "encode", "inversion", "optimisation", "denoising",
               "sampling", "decode", "total"]
BENCH_KEYS = {"settings": "faithful,fast", "warmup": "auto", "flops": "auto", "quick": "false",
              "json": ""}


def parse(argv: list[str]) -> tuple[dict, list[str], list[str]]:
    """(bench options, methods, remaining Hydra overrides) from ``key=value`` arguments."""
    opts, methods, overrides = dict(BENCH_KEYS), ["dragdiffusion"], []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.startswith("bench."):
            name = key[len("bench."):]
            if name not in BENCH_KEYS:
                raise SystemExit(f"bench.py: unknown option {key}; known: "
                                 + ", ".join(f"bench.{k}" for k in BENCH_KEYS))
            opts[name] = value
        elif key == "method":
            methods = [m for m in value.split(",") if m]
        elif key == "hydra.run.dir":   # the run folder of train.py: the JSON goes there
            opts["run_dir"] = value
        else:
            overrides.append(arg)
    return opts, methods, overrides


def compose(method: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=[f"method={method}", "logger.enabled=false",
                                                 "progress=false"] + overrides)


def _flag(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value.lower() in ("1", "true", "yes")


def first_sample(cfg, resolution: int, overrides: list[str]):
    """The benchmark's sample: the configured data's first; built-in procedural and toybench
    samples are drawn at the model's resolution unless ``data.size`` was given."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("shard", None), data_cfg.pop("num_shards", None)
    if str(data_cfg.get("_target_", "")).endswith(("ProceduralSamples", "ToyBench")) and \
            not any(o.startswith("data.size=") for o in overrides):
        data_cfg["size"] = [resolution, resolution]
    data = instantiate(data_cfg)
    if len(data) == 0:
        raise SystemExit("bench.py: the configured data has no samples")
    return data[0]


DRAGON_STEP_KEYS = ("guidance_steps", "dense_guidance_steps", "time_travel_steps", "sde_steps",
                    "ip_steps", "bank_start_step", "blend_bank_steps")


def quick_overrides(cfg) -> list[str]:
    """Hydra overrides of a smoke run (``bench.quick``): fewer LoRA / drag steps, a shorter
    sampling schedule (per-step figures stay comparable, totals do not)."""
    m, out = cfg.method, []
    for key, cap in (("lora_steps", 5), ("n_pix_step", 10)):
        if key in m and int(m[key]) > cap:
            out.append(f"method.{key}={cap}")
    if "inversion_strength" in m or "n_actual_inference_step" in m:
        out.append("method.n_inference_step=20")
    if "n_actual_inference_step" in m:
        n_actual = round(int(m.n_actual_inference_step) * 20 / int(m.n_inference_step))
        out.append(f"method.n_actual_inference_step={n_actual}")
    if "guidance_steps" in m:
        # DragonDiffusion's plan is in step indices: halve the schedule and every index in it
        n = int(m.n_inference_step)
        out.append(f"method.n_inference_step={n // 2}")
        for key in DRAGON_STEP_KEYS:
            if key in m:
                steps = [int(i) * (n // 2) // n for i in np.atleast_1d(m[key])]
                value = steps[0] if isinstance(m[key], int) else steps
                out.append(f"method.{key}={value}".replace(" ", ""))
    return out


def run_pass(cfg, models, sample, speed, precision, count: bool):
    """One edit; returns (EditResult, {stage: StageRecord})."""
    from hydra.utils import instantiate

    from dragexp.core.stages import observe_stages
    from dragexp.experiment import build_drag_callbacks
    from dragexp.methods.base import EditContext
    from dragexp.performance.profiling import StageProbe

    method = instantiate(cfg.method)
    probe = StageProbe(count=count)
    torch.manual_seed(int(cfg.seed))
    with tempfile.TemporaryDirectory() as lora_dir, observe_stages(probe):
        result = method.edit(sample, models, EditContext(
            build_drag_callbacks(cfg), lora_dir=lora_dir, precision=precision, progress=False,
            speed=speed))
    return result, probe.stages


def settings_for(name: str, device: torch.device, method: str, overrides: list[str]):
    """(SpeedSettings, Lightning precision) of ``configs/speed/<name>.yaml``; the faithful
    setting's open precision is the authors' (16-mixed on CUDA, 32-true on the CPU)."""
    from omegaconf import OmegaConf

    from dragexp.performance.speed import SpeedSettings

    cfg = compose(method, overrides + [f"speed={name}"])
    speed = SpeedSettings.from_config(OmegaConf.to_container(cfg.speed, resolve=True))
    precision = speed.precision or ("16-mixed" if device.type == "cuda" else "32-true")
    return speed, precision


def bench_method(method: str, opts: dict, overrides: list[str], master, load_s: float,
                 device: torch.device) -> dict:
    from dragexp.experiment import resolve_precision
    from dragexp.performance.profiling import device_peak, unet_forward_seconds, unet_forward_work
    from dragexp.performance.speed import apply_to_models

    cfg = compose(method, overrides)
    quick = _flag(opts["quick"], False)
    if quick:
        cfg = compose(method, quick_overrides(cfg) + overrides)
    sample = first_sample(cfg, int(master.resolution), overrides)
    warmup = _flag(opts["warmup"], device.type == "cuda")
    flops = opts["flops"]
    if flops == "auto":
        flops = "timed" if quick and device.type != "cuda" and not warmup else "separate"
    if flops not in ("separate", "timed", "off"):
        raise SystemExit(f"bench.py: bench.flops must be auto, separate, timed or off, "
                         f"got {flops!r}")
    out = dict(method=method, sample=sample.name, image_hw=list(sample.image.shape[:2]),
               warmup=warmup, flops_counted=flops, quick=quick, settings={})
    images = {}
    for name in [s for s in opts["settings"].split(",") if s]:
        speed, requested = settings_for(name, device, method, overrides)
        precision, dtype = resolve_precision(requested, device)
        models = None
        try:
            t0 = time.perf_counter()
            models = copy.deepcopy(master).to(device, dtype)
            apply_to_models(models, speed)
            to_device_s = time.perf_counter() - t0
            text = models.encode_prompt(sample.prompt)
            h, w = sample.image.shape[:2]
            forward = unet_forward_work(models.unet, (h // 8, w // 8), text)
            unit, unit_launches = forward.total, forward.launches
            fwd_s = {b: unet_forward_seconds(models.unet, (h // 8, w // 8), text, b, precision)
                     for b in (1, 2)}
            counted = None
            if warmup or flops == "separate":
                counted = run_pass(cfg, models, sample, speed, precision,
                                   count=flops == "separate")[1]
            result, stages = run_pass(cfg, models, sample, speed, precision, count=flops == "timed")
            counted = stages if flops == "timed" else counted or {}
            peak, peak_source = device_peak(device, precision)
            rows = {"model load": dict(seconds=load_s + to_device_s, flops=0, launches=0,
                                       peak_bytes=0)}
            for stage, rec in stages.items():
                work = counted.get(stage, rec)
                rows[stage] = dict(seconds=result.timings.get(stage, rec.seconds),
                                   flops=work.flops, launches=work.launches,
                                   peak_bytes=rec.peak_bytes)
            rows["total"] = dict(seconds=sum(r["seconds"] for r in rows.values()),
                                 flops=sum(r["flops"] for r in rows.values()),
                                 launches=sum(r["launches"] for r in rows.values()),
                                 peak_bytes=max(r["peak_bytes"] for r in rows.values()))
            # What a stage would take if each launch cost what one launch of the plain forward
            # costs: near the measured seconds, the stage is launch-bound, whatever its FLOPs.
            price = fwd_s[1] / unit_launches if unit_launches else 0.0
            for r in rows.values():
                r["launch_bound_seconds"] = r["launches"] * price
                r["unet_forward_equivalents"] = r["flops"] / unit if unit else None
                r["tflops_per_s"] = r["flops"] / r["seconds"] / 1e12 if r["seconds"] > 0 else 0.0
                r["share_of_peak"] = r["tflops_per_s"] / peak if peak else None
            out["settings"][name] = dict(
                precision=precision, speed=speed.__dict__, stages=rows, num_steps=result.num_steps,
                stopped_early=result.stopped_early, unet_forward_flops=unit,
                unet_forward_launches=unit_launches, launch_price_s=price,
                unet_forward_launches_by_op=dict(forward.by_op.most_common()),
                unet_forward_seconds={f"batch{b}": v for b, v in fwd_s.items()}, peak_tflops=peak,
                peak_source=peak_source)
        except Exception as exc:   # keep the other settings' and methods' figures
            import traceback

            traceback.print_exc()
            out["settings"][name] = dict(precision=precision, error=f"{type(exc).__name__}: {exc}")
            models = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        images[name] = result.image
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    names = [n for n in out["settings"] if n in images]
    if len(names) >= 2:
        a, b = names[0], names[1]
        sa, sb = out["settings"][a]["stages"], out["settings"][b]["stages"]
        out["ratio"] = {k: sa[k]["seconds"] / sb[k]["seconds"]
                        for k in sa if k in sb and sb[k]["seconds"] > 0}
        out["difference"] = image_difference(images[a], images[b])
    return out


def image_difference(x: np.ndarray, y: np.ndarray) -> dict:
    """How far two edits of one sample are apart: max / mean absolute pixel difference
    (0..255) and LPIPS (AlexNet, the DragBench metric) when its weights are on disk."""
    d = np.abs(x.astype(np.int16) - y.astype(np.int16))
    out = dict(max_pixel_difference=int(d.max()), mean_pixel_difference=float(d.mean()),
               lpips=None)
    try:
        from dragexp.evaluation.lpips_if import build_lpips, lpips_input

        net = build_lpips("pretrained")
        with torch.no_grad():
            out["lpips"] = float(net(lpips_input(x), lpips_input(y)).flatten()[0])
    except Exception as exc:   # the metric is optional here: report why it is missing
        out["lpips_unavailable"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return out


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n else "-"


def print_method(res: dict, device_label: str) -> None:
    print(f"\n== {res['method']} on {device_label}: sample {res['sample']} "
          f"{res['image_hw'][0]}x{res['image_hw'][1]}, warm-up pass: {res['warmup']}, "
          f"FLOPs counted: {res['flops_counted']}"
          f"{', QUICK (steps capped)' if res['quick'] else ''}")
    for name, s in res["settings"].items():
        if "error" in s:
            print(f"-- {name} ({s['precision']}): FAILED: {s['error']}")
            continue
        print(f"-- {name} ({s['precision']}), {s['num_steps']} drag steps, "
              f"1 UNet forward = {s['unet_forward_flops'] / 1e9:.1f} GFLOP, "
              f"{s['unet_forward_launches']} launches; "
              f"peak {s['peak_tflops'] and round(s['peak_tflops'], 2)} TFLOP/s "
              f"({s['peak_source']})")
        ops = ", ".join(f"{op} {n}" for op, n in
                        list(s.get("unet_forward_launches_by_op", {}).items())[:10])
        print(f"   its launches by op: {ops}")
        fs = s["unet_forward_seconds"]
        print(f"   one plain UNet forward (no grad): batch 1 {1000 * fs['batch1']:.1f} ms, "
              f"batch 2 {1000 * fs['batch2']:.1f} ms; {1e6 * s['launch_price_s']:.1f} us "
              f"per launch ('at price': launches x that)")
        print(f"   {'stage':<13}{'seconds':>9}{'fwd-eq':>9}{'TFLOP/s':>9}{'%peak':>7}"
              f"{'launches':>10}{'at price':>10}{'peak mem':>12}")
        stages = s["stages"]
        for stage in sorted(stages, key=lambda k: STAGE_ORDER.index(k)
                            if k in STAGE_ORDER else len(STAGE_ORDER) - 1):
            r = stages[stage]
            fe = "-" if r["unet_forward_equivalents"] is None else \
                f"{r['unet_forward_equivalents']:.1f}"
            share = "-" if r["share_of_peak"] is None else f"{100 * r['share_of_peak']:.1f}"
            print(f"   {stage:<13}{r['seconds']:>9.3f}{fe:>9}{r['tflops_per_s']:>9.3f}"
                  f"{share:>7}{r['launches']:>10}{r['launch_bound_seconds']:>10.3f}"
                  f"{_fmt_bytes(r['peak_bytes']):>12}")
    if "ratio" in res:
        names = [n for n, s in res["settings"].items() if "error" not in s]
        ratio = ", ".join(f"{k} {v:.2f}x" for k, v in res["ratio"].items())
        print(f"-- {names[0]}/{names[1]} seconds: {ratio}")
        d = res["difference"]
        lp = d["lpips"] if d["lpips"] is not None else f"n/a ({d.get('lpips_unavailable')})"
        print(f"-- edited images differ by max {d['max_pixel_difference']} / mean "
              f"{d['mean_pixel_difference']:.3f} (0..255); LPIPS {lp}")


def main(argv: list[str]) -> dict:
    from hydra.utils import instantiate

    import dragexp.models  # noqa: F401  (import time is not model-load time)
    from dragexp.experiment import pick_device

    opts, methods, overrides = parse(argv)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    cfg0 = compose(methods[0], overrides)
    device = pick_device(cfg0.trainer.get("device", "auto"))
    t0 = time.perf_counter()
    master = instantiate(cfg0.model)
    load_s = time.perf_counter() - t0
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    report = dict(device=label, torch=torch.__version__, model=master.source,
                  overrides=overrides, methods={})
    for i, method in enumerate(methods):
        res = bench_method(method, opts, overrides, master, load_s if i == 0 else 0.0, device)
        report["methods"][method] = res
        print_method(res, label)
        folder = Path(opts["run_dir"]) if opts.get("run_dir") else ROOT / "outputs" / "bench"
        path = Path(opts["json"] or folder / f"bench_{stamp}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))   # after every method: nothing is lost
    print(f"\nJSON: {path}")
    return report
