"""Adapters for the DragonDiffusion / DiffEditor cases (docs/methods.md, DragonDiffusion).

Each adapter builds what the case describes (the tiny UNet with its image-prompt keys, or the
synthetic estimator / generator) and calls the functions :mod:`dragexp.methods.dragondiffusion`
calls for a real edit: :func:`~dragexp.methods.dragondiffusion.regions.process_drag` /
:func:`~dragexp.methods.dragondiffusion.regions.process_move`, :func:`~dragexp.methods.dragondiffusion.energy.guidance_drag` /
:func:`~dragexp.methods.dragondiffusion.energy.guidance_move`, :func:`~dragexp.methods.dragondiffusion.method.run_drag`.
Energy scales are absolute in the function cases and UI values (x 1e3) in the loop cases, as the
cases' parameters say. The case format is described in
../shared/conformance/README_easydrag_dragondiffusion.md, beside the case folders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.schedule import DDIMSchedule
from ..methods.base import working_size
from ..methods.dragondiffusion.energy import DecoderFeatureEstimator, guidance_drag, guidance_move
from ..methods.dragondiffusion.image_prompt import ImagePromptAdapter, dragon_attention
from ..methods.dragondiffusion.memory_bank import (DragonAttentionControl, MemoryBank,
                                                   decoder_self_attention_layers)
from ..methods.dragondiffusion.method import DragonParams, DragonRun, run_drag
from ..methods.dragondiffusion.regions import (copy_latent_patches, feature_scale, process_drag,
                                               process_move)
from ..methods.dragondiffusion.sampling import DragonSchedule, DragonTrace
from .case import Case
from .registry import adapter


class ConvStubEstimator:
    """The conformance cases' synthetic estimator: ``[tanh(conv(avg_pool2(x), Wa, ba)),
    tanh(conv(x, Wb, bb))]`` (stands for ``up_blocks[1]``, ``up_blocks[2]``)."""

    def __init__(self, Wa, ba, Wb, bb):
        self.Wa, self.ba, self.Wb, self.bb = Wa, ba, Wb, bb

    def __call__(self, latent: torch.Tensor, t=None) -> list[torch.Tensor]:
        a = torch.tanh(F.conv2d(F.avg_pool2d(latent, 2), self.Wa, self.ba, padding=1))
        b = torch.tanh(F.conv2d(latent, self.Wb, self.bb, padding=1))
        return [a, b]


def _stub_estimator(case: Case) -> ConvStubEstimator:
    i = case.inputs
    return ConvStubEstimator(i["Wa"].float(), i["ba"].float(), i["Wb"].float(), i["bb"].float())


def _masks(t: torch.Tensor) -> torch.Tensor:
    return t.float()


def _upload(t: torch.Tensor):
    return t.numpy().astype("uint8")


def _params(case: Case, energy_ui: bool) -> DragonParams:
    es = float(case.param("energy_scale"))
    up_ft = case.param("up_ft_index", [1, 2])
    return DragonParams(
        guidance_scale=float(case.param("guidance_scale", 1.0)),
        energy_scale=es * 1e3 if energy_ui else es,
        w_edit=float(case.param("w_edit")), w_content=float(case.param("w_content")),
        w_inpaint=float(case.param("w_inpaint")),
        sde_strength=float(case.param("SDE_strength", 0.4)),
        sde_strength_un=float(case.param("SDE_strength_un", 0.0)),
        up_ft_index=tuple(int(k) for k in up_ft), up_scale=int(case.param("up_scale", 2)),
        plan=DragonSchedule(alg=str(case.param("alg", "D"))))


@adapter("dragondiffusion.fn_process_drag")
def fn_process_drag(case: Case) -> dict[str, torch.Tensor]:
    mask = case.inputs["mask_orig"]
    h0, w0 = mask.shape[-2:]
    H, W = working_size((int(h0), int(w0)), area=float(case.param("max_resolution_sq")))
    input_scale = W / int(w0)
    up_scale = int(case.param("up_scale", 2))
    scale = float(case.param("scale", feature_scale((1, 2), up_scale)))
    regions = process_drag(_upload(mask), case.inputs["points_xy"].tolist(), (H, W), input_scale, scale)
    latent = case.inputs["latent_in"].float().clone()
    copy_latent_patches(latent, regions, up_scale)
    return {
        "mask_x0": regions.mask_x0,
        "mask_other": _masks(regions.mask_other),
        "mask_tar_handle": _masks(regions.handle_patches),
        "mask_cur_target": _masks(regions.target_patches),
        "latent_in_after_copy": latent,
        "input_scale": torch.tensor(input_scale, dtype=torch.float32),
    }


def _guidance_out(g) -> dict[str, torch.Tensor]:
    return {"guidance": g.guidance, "energy_edit_scaled": g.energy_edit.reshape(()),
            "energy_content_scaled": g.energy_content.reshape(()), "grad_edit": g.grad_edit,
            "grad_content": g.grad_content}


def _fn_guidance_drag(case: Case) -> dict[str, torch.Tensor]:
    i = case.inputs
    est = _stub_estimator(case)
    p = _params(case, energy_ui=False)
    t = case.param("t", 0)
    ref = est(i["latent_noise_ref"].float(), t)
    g = guidance_drag(est, i["latent"].float(), ref, t, i["mask_x0"].float(),
                      i["mask_tar_handle"] > 0.5, i["mask_cur_target"] > 0.5, i["mask_other"] > 0.5,
                      p.energy_scale, p.w_edit, p.w_inpaint, p.w_content, p.up_scale,
                      float(case.param("step", 4e-2)))
    return _guidance_out(g)


adapter("dragondiffusion.fn_guidance_drag")(_fn_guidance_drag)
adapter("dragondiffusion.fn_guidance_drag_overlap_nan")(_fn_guidance_drag)


@adapter("dragondiffusion.fn_guidance_move")
def fn_guidance_move(case: Case) -> dict[str, torch.Tensor]:
    i = case.inputs
    est = _stub_estimator(case)
    mask_img = _upload(i["mask_img"])
    H, W = mask_img.shape[:2]
    up_scale = int(case.param("up_scale", 2))
    scale = feature_scale(case.param("up_ft_index", [1, 2]), up_scale)
    mask_ref = i.get("mask_x0_ref")
    regions = process_move(mask_img, (H, W), float(case.param("dx")), float(case.param("dy")), scale,
                           float(case.param("input_scale", 1.0)), float(case.param("resize_scale", 1.0)),
                           None if mask_ref is None else _upload(mask_ref))
    t = case.param("t", 0)
    ref = est(i["latent_noise_ref"].float(), t)
    g = guidance_move(est, i["latent"].float(), ref, t, regions, float(case.param("energy_scale")),
                      float(case.param("w_edit")), float(case.param("w_content")),
                      float(case.param("w_contrast")), float(case.param("w_inpaint")), up_scale)
    out = _guidance_out(g)
    out.update({k: _masks(getattr(regions, k)) for k in
                ("mask_tar", "mask_cur", "mask_other", "mask_overlap", "mask_non_overlap")})
    return out


class _StubGenerator(nn.Module):
    """``case.json -> stub_unet``: eps_b = 0.5 tanh(x_b) t/1000 + 0.2 mean(ctx_b) + 0.1 m_b,
    m_b the mean of the tokens after the first 77 (0 without any)."""

    def __init__(self):
        super().__init__()
        self.mid_block = nn.Identity()      # NoisePredictor's bottleneck hook point (unused)
        self.up_blocks = nn.ModuleList()

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True, **_):
        ctx = encoder_hidden_states
        mean = ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if ctx.shape[1] > 77:
            m = ctx[:, 77:].mean(dim=(1, 2)).view(-1, 1, 1, 1)
        else:
            m = torch.zeros_like(mean)
        t = timestep / 1000 if torch.is_tensor(timestep) else torch.tensor(timestep) / 1000
        eps = 0.5 * torch.tanh(sample) * t + 0.2 * mean + 0.1 * m
        return (eps,) if not return_dict else {"sample": eps}


def _trace_out(trace: DragonTrace, res: dict) -> dict[str, torch.Tensor]:
    def stack(xs, dtype=None):
        if not xs:
            return torch.zeros(0)
        return torch.stack(xs) if dtype is None else torch.tensor(xs, dtype=dtype)

    regions = res["regions"]
    inv = res["inversion"]
    out = {
        "inversion_latents": torch.cat(res["inversion_before_copy"]),
        "latent_in_after_patch_copy": res["latent_in"],
        "inversion_last_after_copy": inv[-1].clone(),
        "mask_x0": regions.mask_x0,
        "mask_other": _masks(regions.mask_other),
        "mask_tar_handle": _masks(regions.handle_patches),
        "mask_cur_target": _masks(regions.target_patches),
        "final_latent": res["final"],
        "edit_unet_call_iter": torch.tensor(trace.call_iter, dtype=torch.int64),
        "edit_unet_call_t": torch.tensor(trace.call_t, dtype=torch.int64),
        "edit_unet_call_latent": stack(trace.call_latent),
        "timetravel_t": stack(trace.timetravel_t, torch.int64),
        "timetravel_input_latent": stack(trace.timetravel_latent),
        "guidance": stack([g.guidance[0] for g in trace.guidance]),
        "guidance_t": torch.tensor(trace.guidance_t, dtype=torch.int64),
        "energy_edit_scaled": stack([g.energy_edit.reshape(()) for g in trace.guidance]),
        "energy_content_scaled": stack([g.energy_content.reshape(()) for g in trace.guidance]),
        "sde_noise": stack(trace.sde_noise),
    }
    return out


def _run_drag_case(case: Case, unet, estimator, controller, keep_raw=()):
    i = case.inputs
    mask = _upload(i["mask_img"])
    H, W = (8 * int(n) for n in i["x0"].shape[-2:])       # working size (the mask may be the upload's)
    params = _params(case, energy_ui=True)
    schedule = DDIMSchedule.sd15(int(case.param("num_inference_steps",
                                                case.param("NUM_DDIM_STEPS", 50))))
    trace = DragonTrace(keep_raw_at=tuple(keep_raw))
    emb_im, emb_un = i.get("emb_im"), i.get("emb_im_uncond")
    torch.manual_seed(int(case.param("seed", 0)))
    run = DragonRun(unet, i["cond_emb"].float(),
                    i["uncond_emb"].float(), params, estimator, schedule, controller,
                    None if emb_im is None else emb_im.float(),
                    None if emb_un is None else emb_un.float(), trace=trace)
    res = run_drag(run, i["x0"].float(), i["points_xy"].tolist(), mask, (H, W),
                   float(case.param("input_scale", 1.0)))
    res["inversion_before_copy"] = res["inversion"][:-1] + [res["z_T"]]
    res["latent_in"] = res["inversion"][-1].clone()
    return res, trace


@adapter("dragondiffusion.fn_edit_schedule_stub")
def fn_edit_schedule_stub(case: Case) -> dict[str, torch.Tensor]:
    res, trace = _run_drag_case(case, _StubGenerator(), _stub_estimator(case), None)
    return _trace_out(trace, res)


class _RecordingEstimator:
    def __init__(self, inner):
        self.inner = inner
        self.calls: list[list[torch.Tensor]] = []

    def __call__(self, latent, t):
        feats = self.inner(latent, t)
        if len(self.calls) < 2:
            self.calls.append([f.detach().clone() for f in feats])
        return feats


@adapter("dragondiffusion.loop_drag")
def loop_drag(case: Case) -> dict[str, torch.Tensor]:
    unet, extra = case.build_unet()
    i = case.inputs
    out: dict[str, torch.Tensor] = {}
    up_ft = [int(k) for k in case.param("up_ft_index", [1, 2])]
    if "check_x" in i:
        with torch.no_grad():
            x, t, ctx = i["check_x"].float(), i["check_t"], i["check_ctx"].float()
            out["check_unet_eps"] = unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
            feats = DecoderFeatureEstimator(unet, ctx, up_ft)(x, t)
        for n, f in enumerate(feats, start=1):
            out[f"check_est_up_ft_l{n}"] = f
    plan = DragonSchedule(alg=str(case.param("alg", "D")))
    ip = None
    if extra:
        ip = ImagePromptAdapter.from_processor_keys(extra, scale=float(case.param("ip_scale", 0.1)),
                                                    num_tokens=int(case.param("num_tokens", 64)))
    controller = DragonAttentionControl(decoder_self_attention_layers(unet), MemoryBank(), "drag",
                                        plan.bank_steps("drag"), plan.ip_steps)
    estimator = _RecordingEstimator(DecoderFeatureEstimator(unet, i["cond_emb"].float(), up_ft,
                                                            controller.plain))
    with dragon_attention(unet, controller, ip):
        res, trace = _run_drag_case(case, unet, estimator, controller, keep_raw=(0, 5, 12))
    out.update(_trace_out(trace, res))
    for k in (0, 5, 12):
        if k in trace.raw_eps:
            out[f"edit_unet_out_uncond_cond_iter{k}"] = trace.raw_eps[k]
    if len(estimator.calls) == 2:
        for name, feats in zip(("ref", "cur"), estimator.calls):
            for n, f in enumerate(feats, start=1):
                out[f"est_up_ft_{name}_call0_l{n}"] = f
    return out
