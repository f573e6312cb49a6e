"""The authors' DragDiffusion / DragNoise loops timed side by side with dragexp's
(``scripts/bench_reference.py`` runs :func:`main`).

Both sides load one diffusers folder (the tiny model or the random-weight SD 1.5, saved once to
a temporary folder), edit one sample with the same settings (50-step DDIM, inversion strength
0.7, the method config's n_pix_step / lr / lam / r_m / r_p / feature_idx) and time each stage
with ``time.perf_counter``, one pass each, no warm-up. The authors' side runs their public code,
unmodified, in a subprocess (:mod:`dragexp.performance.reference_child`, which says exactly what
is called and which two shims it needs); dragexp's side runs the speed settings ``faithful``,
``fast`` (and ``graphs`` where ``configs/speed/graphs.yaml`` exists) through
:mod:`dragexp.performance.bench`'s ``run_pass``. It prints seconds per stage and the ratios
authors / dragexp, then how far the authors' and dragexp-faithful results are apart (text
embedding, inverted latent, optimised tensor, final latent, image), and writes a JSON file whose
path is the last line printed.

Setup (outside the repository: the authors' code is never copied into the project)::

    R=/work/reference        # or any folder; pass it as --reference-dir
    git clone https://github.com/Yujun-Shi/DragDiffusion $R/DragDiffusion
    git -C $R/DragDiffusion checkout ebe659a9c5b7
    git clone https://github.com/haofengl/DragNoise $R/DragNoise
    git -C $R/DragNoise checkout 10727312aef7
    PIP="python -m pip install --no-deps"    # the project's venv python
    $PIP --target $R/env-dd diffusers==0.24.0 huggingface_hub==0.25.2 transformers==4.36.2 \\
        tokenizers==0.15.2 einops==0.8.2
    $PIP --target $R/env-dn diffusers==0.17.1 huggingface_hub==0.25.2 transformers==4.30.2 \\
        tokenizers==0.13.3 einops==0.8.2 tensorboard protobuf absl-py

(huggingface_hub 0.25 is the last with ``cached_download``, which both diffusers versions
import; transformers and tokenizers are pinned because the venv's transformers needs a newer
huggingface_hub; DragNoise's ``utils/drag_utils.py`` imports ``torch.utils.tensorboard``.)
Then::

    python scripts/bench_reference.py                       # tiny model, both methods, CPU
    python scripts/bench_reference.py --method dragnoise --model sd15_random --n-pix-step 10

Options: ``--method dragdiffusion,dragnoise``, ``--model tiny|sd15_random``, ``--size`` (image
side; tiny default 128, sd15_random 512), ``--n-pix-step`` (default: the method config's),
``--lora-steps`` (default 0: the loops without LoRA; the authors' side has no LoRA stage here),
``--settings`` (dragexp speed settings), ``--repeat N`` (passes per side, each stage's minimum
shown; default 1), ``--reference-dir``, ``--json PATH``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dragexp.performance.bench import ROOT

CHILD = Path(__file__).with_name("reference_child.py")
STAGES = ["model load", "lora", "encode", "inversion", "optimisation", "denoising", "decode",
          "total"]


@dataclass(frozen=True)
class Reference:
    """Where one method's authors' code lives (under ``--reference-dir``) and what it is."""

    repo: str
    commit: str
    checkout: str   # folder of the checkout
    env: str        # folder of the pinned packages (pip --target)
    diffusers: str


REFERENCES = {
    "dragdiffusion": Reference("Yujun-Shi/DragDiffusion", "ebe659a9c5b7", "DragDiffusion",
                               "env-dd", "0.24.0"),
    "dragnoise": Reference("haofengl/DragNoise", "10727312aef7", "DragNoise", "env-dn", "0.17.1"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of ``scripts/bench_reference.py`` (see the module docstring)."""
    speed_dir = ROOT / "configs" / "speed"
    default_settings = "faithful,fast" + (",graphs" if (speed_dir / "graphs.yaml").exists()
                                          else "")
    p = argparse.ArgumentParser(prog="bench_reference.py", description=(
        "Time the authors' DragDiffusion / DragNoise code against dragexp's speed settings "
        "on one sample (setup: dragexp/performance/reference_bench.py)."))
    p.add_argument("--method", default="dragdiffusion,dragnoise",
                   help="comma-separated: dragdiffusion, dragnoise")
    p.add_argument("--model", default="tiny", choices=["tiny", "sd15_random"])
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (multiple of 8; tiny: 128, sd15_random: 512)")
    p.add_argument("--n-pix-step", type=int, default=None,
                   help="drag steps (default: configs/method/<method>.yaml)")
    p.add_argument("--lora-steps", type=int, default=0,
                   help="dragexp LoRA steps (default 0: the loops only)")
    p.add_argument("--settings", default=default_settings,
                   help=f"dragexp speed settings (configs/speed/), default {default_settings}")
    p.add_argument("--repeat", type=int, default=1,
                   help="passes per side (default 1); with more, each stage's minimum is shown "
                        "(a shared CPU's transient load only ever adds time)")
    p.add_argument("--reference-dir", default="/work/reference",
                   help="folder with the authors' checkouts and pinned envs")
    p.add_argument("--json", default="", help="where the JSON goes "
                   "(default outputs/bench/bench_reference_<time>.json)")
    args = p.parse_args(argv)
    args.methods = [m for m in args.method.split(",") if m]
    unknown = [m for m in args.methods if m not in REFERENCES]
    if unknown or not args.methods:
        p.error(f"--method: unknown {unknown or args.method!r}; known: {', '.join(REFERENCES)}")
    if args.size is not None and (args.size <= 0 or args.size % 8):
        p.error(f"--size must be a positive multiple of 8, got {args.size}")
    if args.lora_steps > 0:
        p.error("--lora-steps > 0 is not supported yet: the authors' side runs no LoRA "
                "stage here (their train_lora trains in fp16 under "
                "Accelerator(mixed_precision='fp16')); this side by side times the loops")
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    args.settings_list = [s for s in args.settings.split(",") if s]
    return args


def check_reference(method: str, reference_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(checkout, env dir) of ``method``'s reference; SystemExit naming what is missing."""
    ref, root = REFERENCES[method], Path(reference_dir)
    checkout, env = root / ref.checkout, root / ref.env
    needed = [checkout / "drag_pipeline.py", checkout / "utils" / "drag_utils.py",
              env / "diffusers"]
    missing = [p for p in needed if not p.exists()]
    if missing:
        raise SystemExit(
            f"bench_reference.py: {method}: missing {', '.join(map(str, missing))}.\n"
            f"The authors' code goes outside the repository: clone "
            f"https://github.com/{ref.repo} into {checkout} at commit {ref.commit}, and "
            f"install diffusers=={ref.diffusers} (and the pins listed in "
            f"dragexp/performance/reference_bench.py) with pip install --no-deps --target "
            f"{env}; or pass --reference-dir.")
    return checkout, env


def save_model(name: str, size: int, folder: Path) -> Path:
    """Builds the tiny or random SD-1.5 model and saves it as a diffusers pipeline folder both
    sides load. The tokenizer also gets ``vocab.json`` / ``merges.txt`` (from its
    ``tokenizer.json``): the pinned transformers' slow CLIPTokenizer reads only those."""
    from dragexp.models import build_sd15_random, build_tiny, save_bundle

    bundle = build_tiny(seed=0, resolution=size) if name == "tiny" else build_sd15_random(seed=0)
    save_bundle(bundle, folder)
    tok = folder / "tokenizer"
    bpe = json.loads((tok / "tokenizer.json").read_text())["model"]
    (tok / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    _prefix_text_encoder(folder / "text_encoder" / "model.safetensors")
    return folder


def _prefix_text_encoder(path: Path) -> None:
    """Current transformers saves CLIPTextModel's weights without the ``text_model.`` prefix;
    older versions (the pinned 4.30 / 4.36) then find none of them and silently keep random
    ones. With the prefix (how SD-1.5's own checkpoint stores them) every version loads them."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path))
    if not any(k.startswith("text_model.") for k in weights):
        save_file({f"text_model.{k}": v.contiguous() for k, v in weights.items()}, str(path),
                  metadata={"format": "pt"})


def method_settings(cfg) -> dict:
    """The settings both sides use, read from the composed dragexp config."""
    m = cfg.method
    return dict(n_inference_step=int(m.n_inference_step),
                inversion_strength=float(m.inversion_strength),
                feature_idx=[int(i) for i in m.feature_idx], sup_scale=float(m.sup_scale),
                r_m=int(m.r_m), r_p=int(cfg.callbacks.tracking.tracker.radius),
                lam=float(m.lam), lr=float(m.lr), n_pix_step=int(m.n_pix_step),
                start_step=int(m.denoise.start_step), start_layer=int(m.denoise.start_layer),
                end_step=int(m.denoise.end_step))


def run_reference(method: str, args, model_dir: Path, sample, settings: dict,
                  work: Path) -> tuple[dict, dict]:
    """The authors' edit in a subprocess: (result JSON, tensors)."""
    checkout, env = check_reference(method, args.reference_dir)
    np.savez(work / f"{method}_sample.npz", image=sample.image, mask=sample.mask,
             points=np.asarray(sample.points, dtype=np.float64))
    h, w = sample.image.shape[:2]
    req = dict(method=method, model_dir=str(model_dir), sample=str(work / f"{method}_sample.npz"),
               prompt=sample.prompt, settings=settings,
               sup_hw=[int(settings["sup_scale"] * h), int(settings["sup_scale"] * w)],
               result_out=str(work / f"{method}_ref.json"),
               tensors_out=str(work / f"{method}_ref.pt"))
    request = work / f"{method}_req.json"
    request.write_text(json.dumps(req))
    environ = dict(os.environ, PYTHONPATH=f"{env}{os.pathsep}{checkout}",
                   TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    log = work / f"{method}_ref.log"
    with open(log, "w") as out:   # their code prints every drag step and sampler step
        proc = subprocess.run([sys.executable, str(CHILD), str(request)], env=environ,
                              stdout=out, stderr=subprocess.STDOUT, cwd=str(work))
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"the authors' {method} run failed (exit {proc.returncode}); "
                           f"last lines of {log}:\n{tail}")
    return json.loads(Path(req["result_out"]).read_text()), torch.load(req["tensors_out"])


@contextmanager
def recording(store: dict):
    """Records, pass-through, what dragexp's latent-drag pipeline hands between stages: the
    inverted latent, the text embedding, the optimised latent / bottleneck, the final latent."""
    from dragexp.methods.latent_drag import method as latent

    invert, denoise = latent.invert, latent.denoise

    def rec_invert(unet, latent0, text, *a, **k):
        out = invert(unet, latent0, text, *a, **k)
        store.update(text=text.detach().float().cpu(), inverted=out[-1].detach().float().cpu())
        return out

    def rec_denoise(unet, batch, text, *a, bottleneck=None, **k):
        out = denoise(unet, batch, text, *a, bottleneck=bottleneck, **k)
        opt = bottleneck if bottleneck is not None else batch[-1:]
        store.update(optimised=opt[:1].detach().float().cpu(),
                     final_latent=out[-1:].detach().float().cpu())
        return out

    latent.invert, latent.denoise = rec_invert, rec_denoise
    try:
        yield store
    finally:
        latent.invert, latent.denoise = invert, denoise


def run_dragexp(method: str, name: str, overrides: list[str], master, sample,
                load_s: float) -> tuple[dict, dict]:
    """One dragexp edit at speed setting ``name``: (stage seconds, recorded tensors)."""
    from dragexp.experiment import resolve_precision
    from dragexp.performance.bench import compose, run_pass, settings_for
    from dragexp.performance.speed import apply_to_models

    device = torch.device("cpu")
    cfg = compose(method, overrides)
    speed, requested = settings_for(name, device, method, overrides)
    precision, dtype = resolve_precision(requested, device)
    t0 = time.perf_counter()
    models = copy.deepcopy(master).to(device, dtype)
    apply_to_models(models, speed)
    to_device_s = time.perf_counter() - t0
    with recording({}) as store:
        result, _ = run_pass(cfg, models, sample, speed, precision, count=False)
    stages = {"model load": load_s + to_device_s}
    stages.update({k: v for k, v in result.timings.items() if k != "total"})
    stages["total"] = sum(v for k, v in stages.items() if k != "model load")
    store["image"] = torch.from_numpy(result.image.astype(np.float32) / 255.0)
    return dict(stages=stages, precision=precision, num_steps=result.num_steps,
                stopped_early=result.stopped_early), store


def differences(ref: dict, ours: dict) -> dict:
    """Max |authors - dragexp faithful| per recorded tensor (images in 0..255 pixel units;
    the authors' image is float, dragexp's uint8, so up to 0.5 of it is rounding)."""
    out = {}
    for key in ("text", "inverted", "optimised", "final_latent", "image"):
        a, b = ref.get(key), ours.get(key)
        if a is None or b is None:
            continue
        if key == "image":   # authors: (1, 3, H, W) in [0, 1]; ours: (H, W, 3) in [0, 1]
            a = a[0].permute(1, 2, 0)
        if a.shape != b.shape:
            out[key] = f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
            continue
        d = (a - b).abs()
        scale = 255.0 if key == "image" else 1.0
        out[key] = dict(max_abs=float(d.max()) * scale, mean_abs=float(d.mean()) * scale,
                        ref_max_abs=float(a.abs().max()) * scale)
    return out


def bench_method(method: str, args, model_dir: Path, work: Path) -> dict:
    """Both sides for one method: seconds per stage, ratios, differences."""
    from hydra.utils import instantiate

    from dragexp.performance.bench import compose, first_sample

    overrides = ["model=local", f"model.path={model_dir}", f"model.resolution={args.size}",
                 f"method.lora_steps={args.lora_steps}", "trainer.device=cpu"]
    if args.n_pix_step is not None:
        overrides.append(f"method.n_pix_step={args.n_pix_step}")
    cfg = compose(method, overrides)
    t0 = time.perf_counter()
    master = instantiate(cfg.model)
    load_s = time.perf_counter() - t0
    sample = first_sample(cfg, int(master.resolution), overrides)
    settings = method_settings(cfg)
    check_reference(method, args.reference_dir)   # fail before the long dragexp runs

    res = dict(method=method, sample=sample.name, image_hw=list(sample.image.shape[:2]),
               settings=settings, dragexp={})
    print(f"\n== {method}: sample {sample.name} {res['image_hw'][0]}x{res['image_hw'][1]}, "
          f"n_pix_step {settings['n_pix_step']}, lr {settings['lr']}, lam {settings['lam']}, "
          f"{settings['n_inference_step']}-step DDIM, strength {settings['inversion_strength']}",
          flush=True)
    runs = {"authors": []}
    faithful_tensors = None
    for k in range(args.repeat):   # interleaved, so a slow spell does not hit one side only
        print(f"   pass {k + 1}/{args.repeat}: authors' code ...", flush=True)
        ref, ref_tensors = run_reference(method, args, model_dir, sample, settings, work)
        runs["authors"].append(ref)
        for name in args.settings_list:
            print(f"   pass {k + 1}/{args.repeat}: dragexp {name} ...", flush=True)
            run, tensors = run_dragexp(method, name, overrides, master, sample, load_s)
            runs.setdefault(name, []).append(run)
            if name == "faithful":
                faithful_tensors = tensors
    res["passes"] = runs
    res["authors"] = fastest(runs["authors"])
    res["dragexp"] = {name: fastest(runs[name]) for name in args.settings_list}
    ref = res["authors"]
    res["ratios"] = {name: {k: ref["stages"][k] / v["stages"][k]
                            for k in STAGES if k in ref["stages"] and v["stages"].get(k, 0) > 0}
                     for name, v in res["dragexp"].items()}
    if faithful_tensors is not None:
        res["difference_authors_vs_faithful"] = differences(ref_tensors, faithful_tensors)
    return res


def fastest(passes: list[dict]) -> dict:
    """The first pass's record with each stage's seconds replaced by its minimum over passes
    (``total`` is the sum of those minima, model load excluded, as in a single pass)."""
    out = copy.deepcopy(passes[0])
    stages = {k: min(p["stages"].get(k, 0.0) for p in passes)
              for k in passes[0]["stages"] if k != "total"}
    stages["total"] = sum(v for k, v in stages.items() if k != "model load")
    out.update(stages=stages, passes=len(passes))
    return out


def print_method(res: dict) -> None:
    """The side-by-side table of one method, then the equality figures."""
    ref, names = res["authors"], list(res["dragexp"])
    head = f"   {'stage':<14}{'authors':>9}" + "".join(f"{n:>10}" for n in names) + \
        "".join(f"{'a/' + n:>12}" for n in names)
    print(f"-- {res['method']}: seconds per stage (authors: diffusers {ref['diffusers']}, "
          f"{ref['threads']} threads; dragexp "
          + ", ".join(f"{n} {v['precision']}" for n, v in res['dragexp'].items())
          + f"); total excludes model load; min of {ref['passes']} pass(es)")
    print(head)
    for stage in STAGES:
        cells = [ref["stages"].get(stage)] + [v["stages"].get(stage) for v in
                                              res["dragexp"].values()]
        if all(c is None or c < 5e-4 for c in cells):   # e.g. the empty LoRA stage
            continue
        row = "".join(f"{c:>10.3f}" if c is not None else f"{'-':>10}" for c in cells[1:])
        ratio = "".join(f"{res['ratios'][n][stage]:>11.2f}x" if stage in res["ratios"][n]
                        else f"{'-':>12}" for n in names)
        first = f"{cells[0]:>9.3f}" if cells[0] is not None else f"{'-':>9}"
        print(f"   {stage:<14}{first}{row}{ratio}")
    steps = ", ".join(f"{n} {v['num_steps']} steps"
                      + (" (stopped early)" if v["stopped_early"] else "")
                      for n, v in res["dragexp"].items())
    print(f"   drag loop: authors {ref['drag_iterations']} iterations; dragexp {steps}")
    print(f"   authors' shims: {'; '.join(ref['shims'])}")
    diff = res.get("difference_authors_vs_faithful")
    if diff:
        print("-- authors vs dragexp faithful, max |difference| (mean; largest |value|):")
        for key, d in diff.items():
            unit = " (0..255)" if key == "image" else ""
            print(f"   {key:<14}" + (d if isinstance(d, str) else
                                     f"{d['max_abs']:.3g}{unit} (mean {d['mean_abs']:.3g}; "
                                     f"|ref| max {d['ref_max_abs']:.3g})"))


def main(argv: list[str]) -> dict:
    """Runs the side by side for every ``--method``; returns the report written to JSON."""
    args = parse_args(argv)
    for method in args.methods:   # a missing checkout fails now, not after the model build
        check_reference(method, args.reference_dir)
    args.size = args.size or (128 if args.model == "tiny" else 512)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    path = Path(args.json or ROOT / "outputs" / "bench" / f"bench_reference_{stamp}.json")
    report = dict(device=f"cpu ({torch.get_num_threads()} threads)", torch=torch.__version__,
                  model=args.model, size=args.size, lora_steps=args.lora_steps,
                  references={m: REFERENCES[m].__dict__ for m in args.methods}, methods={})
    with tempfile.TemporaryDirectory(prefix="bench_reference_") as tmp:
        work = Path(tmp)
        model_dir = save_model(args.model, args.size, work / "model")
        for method in args.methods:
            res = bench_method(method, args, model_dir, work)
            report["methods"][method] = res
            print_method(res)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1))   # after every method
    print(f"\nJSON: {path}")
    return report
