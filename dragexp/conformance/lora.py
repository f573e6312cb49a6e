"""Adapters for DragDiffusion's LoRA cases: ``fn_lora_train`` and ``fn_lora_augment``.

Both run the project's own code: :class:`dragexp.modules.lora_finetune.LoRAFineTune` fitted by a
real Lightning Trainer (with the case's draws replayed through
:class:`~dragexp.modules.lora_finetune.ReplayDraws` and a recording callback), and
:func:`dragexp.core.augment.lora_views`. See docs/methods.md, DragDiffusion 1;
the case format is in ../shared/conformance/README_dragdiffusion_dragnoise.md ("LoRA training,
LoRA augmentation"), beside the case folders.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import nn

from ..core.augment import lora_views, resize_shorter
from ..core.lora import add_lora, lora_named_parameters, set_lora_state
from ..modules.lora_finetune import LoRAFineTune, ReplayDraws, fit_lora
from .case import Case, CaseError
from .registry import adapter

PATTERN = "<key>"


class _InjectedPosterior(nn.Module):
    """Stands in for the VAE, like the recording harness's stub: the case injects the posterior
    samples (``ReplayDraws``), so ``encode`` only hands back a placeholder distribution."""

    dtype = torch.float32

    def encode(self, x: torch.Tensor):
        return SimpleNamespace(latent_dist=None)


class _LoRARecorder(L.Callback):
    """Records, per step, the module's ``last_step``, the LoRA gradients before the optimiser
    step (norms of all matrices, full gradients of ``watch``) and ``watch``'s weights after it."""

    def __init__(self, key_order: list[str], watch: list[str]):
        self.key_order = key_order
        self.watch = watch
        self.steps: list[dict[str, torch.Tensor]] = []
        self.grad_norms: list[torch.Tensor] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        named = lora_named_parameters(pl_module.unet)
        grads = {k: (p.grad.detach().float().clone() if p.grad is not None
                     else torch.zeros_like(p, dtype=torch.float32)) for k, p in named.items()}
        self.grad_norms.append(torch.stack([torch.linalg.vector_norm(grads[k])
                                            for k in self.key_order]).cpu())
        self.grads.append({k: grads[k].cpu() for k in self.watch})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.cpu() for k, v in pl_module.last_step.items()})
        named = lora_named_parameters(pl_module.unet)
        self.weights.append({k: named[k].detach().float().cpu().clone() for k in self.watch})


def _int(case: Case, name: str, default=None) -> int:
    return int(case.param(name, default))


def _float(case: Case, name: str, default=None) -> float:
    return float(case.param(name, default))


def _optimizer_settings(case: Case) -> float:
    """AdamW weight decay from the case; betas/eps must be the module's (0.9, 0.999, 1e-8)."""
    opt = case.param("optimizer", {"weight_decay": 1e-2})
    betas = tuple(opt.get("betas", (0.9, 0.999)))
    eps = float(opt.get("eps", 1e-8))
    if betas != (0.9, 0.999) or eps != 1e-8 or opt.get("amsgrad", False):
        raise CaseError(f"{case.path}: optimizer {opt} differs from train_lora's AdamW")
    return float(opt.get("weight_decay", 1e-2))


@adapter("dragdiffusion.fn_lora_train")
def lora_train(case: Case) -> dict[str, torch.Tensor]:
    inp = case.inputs
    steps = _int(case, "lora_step")
    batch = _int(case, "lora_batch_size")
    rank = _int(case, "lora_rank")
    lr = _float(case, "lora_lr")
    scale = _float(case, "vae_scaling_factor", 0.18215)
    weight_decay = _optimizer_settings(case)
    resolution = 512  # the reference's view size; the image is square, so no crop is drawn

    unet, _ = case.build_unet()
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out["check_eps"] = unet(inp["check_input"], inp["check_t"],
                                encoder_hidden_states=inp["check_text"]).sample

    add_lora(unet, rank=rank)
    init = {k[len("lora_init."):]: v.float() for k, v in inp.items() if k.startswith("lora_init.")}
    set_lora_state(unet, init)
    key_order = list(case.meta.get("lora_key_order") or init.keys())

    expected = list(case.meta.get("expected", {}).keys())
    watch = sorted({k.split(".", 1)[1] for k in expected
                    if PATTERN not in k and k.split(".", 1)[0] in ("grad", "weight_per_step")})

    draws = ReplayDraws(posterior_samples=inp["posterior_samples"].float(),
                        noise=inp["noise"].float(), timesteps=inp["timesteps"].long())
    image = np.zeros((resolution, resolution, 3), dtype=np.uint8)
    module = LoRAFineTune(unet, _InjectedPosterior(), inp["text_embeddings"].float(), image,
                          scaling_factor=scale, rank=rank, lr=lr, weight_decay=weight_decay,
                          steps=steps, batch_size=batch, resolution=resolution, draws=draws)
    rec = _LoRARecorder(key_order, watch)
    fit_lora(module, callbacks=[rec], progress=False,
             trainer_kwargs=dict(accelerator="cpu", precision="32-true"))
    if len(rec.steps) != steps:
        raise CaseError(f"ran {len(rec.steps)} steps, expected {steps}")
    final = module.final_lora_state

    for key in expected:
        if PATTERN in key:
            prefix = key.split(PATTERN)[0]
            if prefix == "lora_final.":
                out.update({prefix + k: final[k] for k in key_order})
            elif prefix == "lora_init.":
                out.update({prefix + k: init[k] for k in key_order})
            else:
                raise CaseError(f"unknown expected pattern {key!r}")
        elif key in ("loss", "noisy_model_input", "unet_timesteps", "model_pred"):
            out[key] = torch.stack([s[key] for s in rec.steps])
        elif key == "grad_norm":
            out[key] = torch.stack(rec.grad_norms)
        elif key.startswith("grad."):
            name = key[len("grad."):]
            out[key] = torch.stack([g[name] for g in rec.grads])
        elif key.startswith("weight_per_step."):
            name = key[len("weight_per_step."):]
            out[key] = torch.stack([w[name] for w in rec.weights])
        elif key == "ddpm_alphas_cumprod":
            out[key] = module.alphas_cumprod.detach().cpu()
        elif key not in out:
            raise CaseError(f"no rule for expected key {key!r}")
    return out


@adapter("dragdiffusion.fn_lora_augment")
def lora_augment(case: Case) -> dict[str, torch.Tensor]:
    image = case.inputs["image"].numpy().astype(np.uint8)
    offsets = case.inputs["crop_offsets"].long()
    size = _int(case, "resize", 512)
    if _int(case, "crop", size) != size:
        raise CaseError(f"{case.path}: resize and crop sizes differ; train_lora uses one size")
    n_views = _int(case, "lora_batch_size", offsets.shape[0])

    draws = ReplayDraws(crops=offsets.reshape(-1).tolist())
    batch = lora_views(image, n_views, size, randint=draws.crop)
    resized = np.asarray(resize_shorter(Image.fromarray(image), size))
    highs = (torch.tensor(draws.crop_highs, dtype=torch.int64).reshape(-1, 2) if draws.crop_highs
             else torch.ones(n_views, 2, dtype=torch.int64))  # a size x size image draws nothing

    out = {"image_batch": batch, "resized_image": torch.from_numpy(resized.copy()),
           "resized_hw": torch.tensor(resized.shape[:2], dtype=torch.int64),
           "crop_randint_high": highs}
    missing = [k for k in case.meta.get("expected", {}) if k not in out]
    if missing:
        raise CaseError(f"no rule for expected keys {missing}")
    return {k: out[k] for k in case.meta.get("expected", out)}
