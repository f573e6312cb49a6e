"""The authors' side of ``scripts/bench_reference.py``: one timed edit with their public code.

Run by :mod:`dragexp.performance.reference_bench` as a script (never imported by dragexp) in a
subprocess whose ``PYTHONPATH`` is ``<env dir>:<authors' checkout>``: the env dir holds the
diffusers / transformers versions their code was written for, torch comes from the venv.
It imports nothing from dragexp (the pinned diffusers would clash with the project's).

    python reference_child.py REQUEST.json

REQUEST.json names the method (``dragdiffusion`` or ``dragnoise``), the diffusers model folder,
the sample (``.npz``: image, mask, points, prompt), the settings, and where to write the result
(timings JSON + a ``.pt`` of tensors for the parent's equality check).

What runs is the authors' code, unmodified: ``DragPipeline.from_pretrained``,
``modify_unet_forward``, ``unet.set_default_attn_processor`` (their no-LoRA branch),
``DragPipeline.invert``, ``utils.drag_utils.drag_diffusion_update``, for DragDiffusion
``utils.attn_utils.MutualSelfAttentionControl`` + ``register_attention_editor_diffusers``, and
``DragPipeline.__call__``. The glue around those calls is ours: it does what their
``utils/ui_utils.py::run_drag`` does (that module cannot be imported here: it needs gradio and
cv2 at import and CUDA in its body), on the CPU in fp32 (their GPU run uses fp16 weights and
fp16 autocast; on a machine without CUDA torch disables their ``autocast('cuda')`` and
``GradScaler`` itself). Shims, both outside the timed arithmetic:

* ``peft`` is hidden from diffusers (``sys.modules['peft'] = None``): the authors' environment
  has no peft, and the venv's peft needs a newer transformers than the pinned one.
* DragNoise only, and only without CUDA: ``DragPipeline.get_text_embeddings`` calls
  ``.cuda()`` on the token ids; ``torch.Tensor.cuda`` is made the identity so it runs on the CPU.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from types import SimpleNamespace

# The script's own folder (dragexp/performance) must not shadow the authors' modules.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
sys.modules["peft"] = None   # find_spec('peft') is then None: diffusers runs without peft

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Stopwatch:
    """Seconds per stage and call counts of wrapped functions (wrappers pass everything through)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def counted(self, name: str, fn):
        """``fn`` wrapped so that each call adds 1 to ``counts[name]``."""
        def wrapper(*args, **kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def timed(self, stage: str, fn):
        """``fn`` wrapped so that each call's wall time adds to ``stage``."""
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - t0)
        return wrapper


def _scheduler():
    """The DDIM scheduler run_drag builds (SD-1.5 betas, no alpha-to-one, offset 1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _inputs(sample_path: str, sup_hw: tuple[int, int]):
    """(source image (1, 3, H, W) in [-1, 1], supervision-size mask, handles, targets) the way
    run_drag prepares them: the UI's 0/255 mask binarised and nearest-resized, clicks (x, y)
    scaled to the supervision grid as (row, col) with torch.round."""
    data = np.load(sample_path)
    image, mask = data["image"], data["mask"]
    full_h, full_w = image.shape[:2]
    source = torch.from_numpy(image).float() / 127.5 - 1
    source = source.permute(2, 0, 1)[None]
    m = torch.from_numpy(mask.astype(np.float32) * 255.0) / 255.0
    m[m > 0.0] = 1.0
    m = F.interpolate(m[None, None], sup_hw, mode="nearest")
    handles, targets = [], []
    for k, (x, y) in enumerate(data["points"].tolist()):
        point = torch.round(torch.tensor([y / full_h * sup_hw[0], x / full_w * sup_hw[1]]))
        (handles if k % 2 == 0 else targets).append(point)
    return source, m, handles, targets


def _args(req: dict, full_hw: tuple[int, int]) -> SimpleNamespace:
    """The ``args`` namespace run_drag hands to drag_diffusion_update."""
    s = req["settings"]
    n = int(s["n_inference_step"])
    return SimpleNamespace(
        prompt=req["prompt"], n_inference_step=n,
        n_actual_inference_step=round(float(s["inversion_strength"]) * n), guidance_scale=1.0,
        unet_feature_idx=list(s["feature_idx"]), r_m=int(s["r_m"]), r_p=int(s["r_p"]),
        lam=float(s["lam"]), lr=float(s["lr"]), n_pix_step=int(s["n_pix_step"]),
        end_step=int(s.get("end_step", 0)),
        sup_res_h=int(s["sup_scale"] * full_hw[0]), sup_res_w=int(s["sup_scale"] * full_hw[1]))


def _load(req: dict, watch: Stopwatch):
    from drag_pipeline import DragPipeline

    t0 = time.perf_counter()
    model = DragPipeline.from_pretrained(req["model_dir"], scheduler=_scheduler(),
                                         safety_checker=None, torch_dtype=torch.float32)
    model.modify_unet_forward()
    watch.add("model load", time.perf_counter() - t0)
    # The VAE encode and decode run inside invert() / __call__; timing these two methods lets
    # the parent compare stage by stage (their time is taken out of inversion / denoising).
    model.image2latent = watch.timed("encode", model.image2latent)
    model.latent2image = watch.timed("decode", model.latent2image)
    # counts the drag loop's UNet feature forwards (1 for F0, then 1 per loop iteration)
    model.forward_unet_features = watch.counted("feature forwards", model.forward_unet_features)
    return model


def _invert(model, source, prompt: str, args, watch: Stopwatch, **text_kwargs):
    """The checkouts' common preamble: their ``invert`` (guidance 1), timed, then the drag's
    timestep. (z_t, a copy of it kept for denoising, t); the checkouts differ only in whether
    the text embedding is handed in (``text_kwargs``)."""
    t0 = time.perf_counter()
    z_t = model.invert(source, prompt, guidance_scale=1.0,
                       num_inference_steps=args.n_inference_step,
                       num_actual_inference_steps=args.n_actual_inference_step, **text_kwargs)
    watch.add("inversion", time.perf_counter() - t0 - watch.seconds.get("encode", 0.0))
    model.scheduler.set_timesteps(args.n_inference_step)
    t = model.scheduler.timesteps[args.n_inference_step - args.n_actual_inference_step]
    return z_t, copy.deepcopy(z_t), t


def run_dragdiffusion(req: dict, watch: Stopwatch) -> dict:
    """DragDiffusion (ebe659a9c5b7): invert, drag the latent, denoise with mutual attention."""
    from utils.attn_utils import MutualSelfAttentionControl, register_attention_editor_diffusers
    from utils.drag_utils import drag_diffusion_update

    model = _load(req, watch)
    torch.manual_seed(42)   # run_drag's seed_everything(42); nothing below draws from it
    source, mask, handles, targets = _inputs(req["sample"], req["sup_hw"])
    args = _args(req, tuple(source.shape[-2:]))
    model.unet.set_default_attn_processor()   # run_drag without a LoRA
    text = model.get_text_embeddings(req["prompt"])

    z_t, z_orig, t = _invert(model, source, req["prompt"], args, watch,
                             encoder_hidden_states=text)

    t0 = time.perf_counter()
    edited = drag_diffusion_update(model, z_t, text, t, handles, targets, mask, args)
    watch.add("optimisation", time.perf_counter() - t0)

    s = req["settings"]
    editor = MutualSelfAttentionControl(start_step=int(s["start_step"]),
                                        start_layer=int(s["start_layer"]),
                                        total_steps=args.n_inference_step, guidance_scale=1.0)
    register_attention_editor_diffusers(model, editor, attn_processor="attn_proc")
    t0 = time.perf_counter()
    image, latents = model(prompt=req["prompt"], encoder_hidden_states=torch.cat([text] * 2),
                           batch_size=2, latents=torch.cat([z_orig, edited.detach()]),
                           guidance_scale=1.0, num_inference_steps=args.n_inference_step,
                           num_actual_inference_steps=args.n_actual_inference_step,
                           return_intermediates=True)
    watch.add("denoising", time.perf_counter() - t0 - watch.seconds.get("decode", 0.0))
    return dict(text=text, inverted=z_orig, optimised=edited.detach(), final_latent=latents[-1][1:2],
                image=F.interpolate(image[1:2], tuple(source.shape[-2:]), mode="bilinear"))


def run_dragnoise(req: dict, watch: Stopwatch) -> dict:
    """DragNoise (10727312aef7): invert, optimise the bottleneck, denoise propagating it."""
    from utils.drag_utils import drag_diffusion_update

    if not torch.cuda.is_available():   # get_text_embeddings hard-codes .cuda()
        torch.Tensor.cuda = lambda self, *a, **k: self
    model = _load(req, watch)
    torch.manual_seed(42)
    source, mask, handles, targets = _inputs(req["sample"], req["sup_hw"])
    args = _args(req, tuple(source.shape[-2:]))
    model.unet.set_default_attn_processor()

    z_t, z_orig, t = _invert(model, source, req["prompt"], args, watch)

    t0 = time.perf_counter()
    updated, h_feature, _ = drag_diffusion_update(model, z_t, t, handles, targets, mask, args)
    watch.add("optimisation", time.perf_counter() - t0)

    t0 = time.perf_counter()
    image, latents = model(prompt=req["prompt"], h_feature=h_feature.detach(),
                           end_step=args.end_step, batch_size=2,
                           latents=torch.cat([z_orig, updated]), guidance_scale=1.0,
                           num_inference_steps=args.n_inference_step,
                           num_actual_inference_steps=args.n_actual_inference_step,
                           return_intermediates=True)
    watch.add("denoising", time.perf_counter() - t0 - watch.seconds.get("decode", 0.0))
    return dict(text=model.get_text_embeddings(req["prompt"]), inverted=z_orig,
                optimised=h_feature.detach(), final_latent=latents[-1][1:2],
                image=F.interpolate(image[1:2], tuple(source.shape[-2:]), mode="bilinear"))


RUNNERS = {"dragdiffusion": run_dragdiffusion, "dragnoise": run_dragnoise}


def main(request_path: str) -> None:
    with open(request_path) as f:
        req = json.load(f)
    import diffusers

    watch = Stopwatch()
    tensors = RUNNERS[req["method"]](req, watch)
    torch.save({k: v.detach().float().cpu() for k, v in tensors.items()}, req["tensors_out"])
    stages = dict(watch.seconds)
    stages["total"] = sum(v for k, v in stages.items() if k != "model load")
    with open(req["result_out"], "w") as f:
        json.dump(dict(stages=stages, diffusers=diffusers.__version__, torch=torch.__version__,
                       threads=torch.get_num_threads(), shims=_shims(req["method"]),
                       drag_iterations=watch.counts.get("feature forwards", 1) - 1), f)


def _shims(method: str) -> list[str]:
    out = ["peft hidden from diffusers (absent from the authors' environment)"]
    if method == "dragnoise" and not torch.cuda.is_available():
        out.append("torch.Tensor.cuda = identity (get_text_embeddings hard-codes .cuda())")
    return out


if __name__ == "__main__":
    main(sys.argv[1])
