"""Adapters for the EasyDrag cases (docs/methods.md, EasyDrag 1-16).

Each adapter builds what the case describes (the tiny UNet, or the small synthetic model of a
function case) and calls the functions :mod:`dragexp.methods.easydrag` calls: the point
conversion, the full inversion, the shared drag optimisation with EasyDrag's target, loss and
callbacks (a real Trainer), and the reference-guided sampling. A synthetic feature model plugs
into :class:`~dragexp.drag.targets.ReferenceLatentTarget` as its ``forward_fn``; a synthetic noise
model replaces the UNet in the inversion and the sampler. The case format is described in
../shared/conformance/README_easydrag_dragondiffusion.md, beside the case folders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dragexp.callbacks import AutoMask, PointTracking, StopWhenReached, TrajectoryRecorder
from dragexp.callbacks.drag import DragCallback
from dragexp.modules.drag_optimisation import CosineDragObjective, fit_drag

from ..core.features import concat_at_finest
from ..core.sampling import NoisePredictor, ReferenceAttentionUNet
from ..core.schedule import DDIMSchedule
from ..drag.losses import all_reached, gradient_mask, refine_radius
from ..drag.trackers import NextPointTracker, handles_moved, next_point
from ..methods.easydrag.method import (drag_module, drag_points, invert_all, sample_with_reference,
                                       user_mask)
from .case import Case, CaseError
from .registry import adapter


def _jump_snap(case: Case) -> tuple[float, float]:
    return float(case.param("K", 12)), float(case.param("snap_threshold", 18))


@adapter("easydrag.fn_next_point")
def fn_next_point(case: Case) -> dict[str, torch.Tensor]:
    p, t = case.inputs["p_rc"].float(), case.inputs["t_rc"].float()
    jump, snap = _jump_snap(case)
    shape = case.param("refine_r shape")
    nxt = torch.stack([next_point(a, b, jump, snap) for a, b in zip(p, t)])
    r0 = [refine_radius(a, b, 0, shape) for a, b in zip(p, t)]
    r3 = [refine_radius(a, b, 3, shape) for a, b in zip(p, t)]
    return {"next_point": nxt,
            "refine_r_h_w_r0": torch.tensor(r0, dtype=torch.int64),
            "refine_r_h_w_r3": torch.tensor(r3, dtype=torch.int64)}


@adapter("easydrag.fn_point_tracking")
def fn_point_tracking(case: Case) -> dict[str, torch.Tensor]:
    tracker = NextPointTracker(*_jump_snap(case))
    out, upd, before, after = [], [], [], []
    inp = case.inputs
    for s in range(inp["F0"].shape[0]):
        h, t = inp["handle_points_rc"][s].float(), inp["target_points_rc"][s].float()
        new = tracker(inp["F0"][s].float(), inp["F1"][s].float(),
                      inp["handle_points_init_rc"][s].float(), h, targets=t)
        out.append(new)
        upd.append(int(handles_moved(h, new)))
        before.append(int(all_reached(h, t, 1.0)))
        after.append(int(all_reached(new, t, 1.0)))
    i32 = dict(dtype=torch.int32)
    return {"handle_points_out": torch.stack(out), "update_point": torch.tensor(upd, **i32),
            "reach_target_before": torch.tensor(before, **i32),
            "reach_target_after": torch.tensor(after, **i32)}


@adapter("easydrag.fn_auto_mask")
def fn_auto_mask(case: Case) -> dict[str, torch.Tensor]:
    thr = float(case.param("threshold", 100))
    grads = case.inputs["grad"].float()
    return {"mask": torch.cat([gradient_mask(g[None], thr)[0] for g in grads])}


class _Trace(DragCallback):
    """Per-step traces of a drag run (after tracking, stop and auto mask)."""

    drag_hook_order = 90

    def __init__(self):
        self.moved: list[int] = []
        self.recomputed: list[int] = []
        self.losses: list[float] = []
        self.latents: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []

    def on_drag_features(self, trainer, module, state):
        self.moved.append(int(state.moved))
        if not state.stop:
            self.recomputed.append(int(state.step == 0 or state.moved))

    def on_drag_step_end(self, trainer, module, state):
        self.losses.append(float(state.loss))
        self.latents.append(module.param.detach().clone())
        self.grads.append(module.param.grad.detach().clone())


def _callbacks(case: Case, auto_mask: bool):
    jump, snap = _jump_snap(case)
    if not bool(case.param("point_track", True)):
        raise CaseError("point_track=False: the authors' loop never defines its mask then "
                        "(a NameError); only point tracking is supported")
    cbs = [PointTracking(NextPointTracker(jump, snap), start_step=0), StopWhenReached(1.0)]
    mask_cb = AutoMask(100.0) if auto_mask else None
    return cbs + ([mask_cb] if mask_cb else []) + [TrajectoryRecorder(), _Trace()], mask_cb


def _run_drag(case: Case, unet, z_t, t, cond, handles, targets, mask, schedule, feature_idx,
              forward_fn=None):
    no_mask = bool(case.param("no_mask", True))
    callbacks, mask_cb = _callbacks(case, no_mask)
    objective = CosineDragObjective(int(case.param("r_m", 0)), *_jump_snap(case))
    module = drag_module(unet, z_t, t, cond, handles, targets, mask, schedule, feature_idx,
                         objective, float(case.param("lr")), int(case.param("n_pix_step")),
                         bool(case.param("training_reference", True)), forward_fn)
    fit_drag(module, callbacks, precision="32-true", accelerator="cpu", progress=False)
    return module, callbacks[-2], callbacks[-1], mask_cb


def _drag_traces(module, recorder, trace, mask_cb, prefix: str = "") -> dict[str, torch.Tensor]:
    i32 = dict(dtype=torch.int32)
    out = {
        "handle_points_after_tracking": torch.tensor(recorder.handles, dtype=torch.float32),
        "update_point_from_tracking": torch.tensor(trace.moved, **i32),
        "mask_recomputed": torch.tensor(mask_cb.recomputed if mask_cb else trace.recomputed, **i32),
        "num_optim_steps": torch.tensor(module.num_steps, dtype=torch.int64),
        "loss_total": torch.tensor(trace.losses, dtype=torch.float32),
        "latent_after_step": torch.cat(trace.latents) if trace.latents else module.result[:0],
        "grad_step": torch.cat(trace.grads) if trace.grads else module.result[:0],
    }
    if mask_cb is not None:
        hw = module.z_t.shape[-2:]
        out["loss_gen_at_mask_update"] = torch.tensor(mask_cb.point_losses, dtype=torch.float32)
        out["grad_at_mask_update"] = (torch.cat(mask_cb.grads) if mask_cb.grads
                                      else module.result[:0])
        out["auto_masks_latentres"] = (torch.cat(mask_cb.masks)[:, 0] if mask_cb.masks
                                       else torch.zeros(0, *hw))
    return {prefix + k: v for k, v in out.items()}


def _drag_update(case: Case) -> dict[str, torch.Tensor]:
    """``drag_diffusion_update`` with the synthetic feature model tanh(conv3x3(z))."""
    inp = case.inputs
    W_feat, b_feat = inp["W_feat"].float(), inp["b_feat"].float()
    z = inp["init_code"].float()
    h, w = z.shape[-2:]
    scale = int(case.param("feat_scale", 8))
    size = (h * scale, w * scale)

    def synthetic(unet, x, t, text, feature_idx):
        return torch.zeros_like(x), [torch.tanh(F.conv2d(x, W_feat, b_feat, padding=1))]

    handles, targets = drag_points(inp["points_xy"].tolist(), size, size)
    if bool(case.param("no_mask", True)):
        mask = torch.zeros(1, 1, *size)
    else:
        mask = user_mask(inp["user_mask"], size)
    text = torch.zeros(1, 1, 1)
    module, recorder, trace, mask_cb = _run_drag(
        case, nn.Identity(), z, int(case.param("t", 681)), text, handles, targets, mask,
        DDIMSchedule.sd15_ldm(), [0], synthetic)
    out = _drag_traces(module, recorder, trace, mask_cb)
    # The authors' point_tracking assigns into the handle list it was given, and the function
    # cases recorded that list after the run: their "handle_points_rc_init" is the last tracked
    # handles (the loop cases record the clicked handles).
    out.update({"handle_points_rc_init": module.handles.clone(), "target_points_rc": targets,
                "final_latent": module.result})
    return out


adapter("easydrag.fn_drag_update_automask")(_drag_update)
adapter("easydrag.fn_drag_update_usermask")(_drag_update)


def _schedule_keys(schedule: DDIMSchedule) -> dict[str, torch.Tensor]:
    ts = list(reversed(schedule.timesteps))                 # 1, 21, ..., 981
    return {
        "ddim_timesteps": torch.tensor(ts, dtype=torch.int64),
        "ddim_alphas": torch.stack([schedule.alpha_bar(t) for t in ts]),
        "ddim_alphas_prev": torch.stack([schedule.alpha_bar(t - schedule.step_ratio)
                                         for t in ts]).double(),
    }


def _negative(case: Case, cond: torch.Tensor) -> torch.Tensor:
    """The negative-prompt embedding: the prompt's when ``neg_same_prompt`` (the default).

    Otherwise the input named like a negative/unconditional embedding, or failing that the one
    other input shaped like ``cond_emb``.
    """
    if bool(case.param("neg_same_prompt", True)):
        return cond
    others = {k: v for k, v in case.inputs.items()
              if k != "cond_emb" and v.shape == cond.shape}
    named = [k for k in others if any(s in k.lower() for s in ("uncond", "neg", "n_prompt"))]
    if named or len(others) == 1:
        return others[(named or list(others))[0]].float()
    raise CaseError("neg_same_prompt is False but no negative embedding among the inputs "
                    f"({sorted(case.inputs)})")


def _gen(model, start, cond, uncond, schedule, start_index, latents, case: Case):
    outs = [start]
    final = sample_with_reference(model, start, cond, uncond, schedule, start_index, latents,
                                  float(case.param("guidance_scale")),
                                  int(case.param("ref_start_step")),
                                  int(case.param("reference_offset", 1)),
                                  bool(case.param("reference_only", True)),
                                  on_step=lambda i, t, x: outs.append(x))
    return final, torch.cat(list(reversed(outs)))


@adapter("easydrag.fn_sampling_invert_gen")
def fn_sampling_invert_gen(case: Case) -> dict[str, torch.Tensor]:
    """``invert`` + ``gen`` with the synthetic eps model of ``case.json → stub_model``."""
    inp = case.inputs
    x0, cond = inp["x0"].float(), inp["cond_emb"].float()
    uncond = _negative(case, cond)

    def model(x, t, ctx):
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        eps = 0.5 * torch.tanh(x) * (tt / 1000).view(-1, 1, 1, 1) \
            + 0.2 * ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if x.shape[0] == 2:
            eps = torch.cat([eps[:1] + 0.3 * x[1:2], eps[1:]])
        return eps

    schedule = DDIMSchedule.sd15_ldm(int(case.param("n_inference_step", 50)))
    n_actual = int(case.param("n_actual_inference_step"))
    latents = invert_all(lambda x, t, i: model(x, t, cond), x0, schedule)
    start = latents[n_actual] + inp["drag_latent_delta"].float()
    final, gen = _gen(model, start, cond, uncond, schedule, schedule.edit_index(n_actual),
                      latents, case)
    out = {"inversion_latents": torch.cat(latents), "invert_code": latents[n_actual],
           "gen_latents": gen, "gen_final_latent": final}
    out.update(_schedule_keys(schedule))
    return out


@adapter("easydrag.loop_pipeline")
def loop_pipeline(case: Case) -> dict[str, torch.Tensor]:
    """The whole ``inference()`` path on the tiny UNet: invert, drag, reference-guided gen."""
    unet, _ = case.build_unet()
    inp = case.inputs
    x0, cond = inp["x0"].float(), inp["cond_emb"].float()
    uncond = _negative(case, cond)
    h, w = x0.shape[-2:]
    scale = int(case.param("feat_scale", 8))
    size = (h * scale, w * scale)
    schedule = DDIMSchedule.sd15_ldm(int(case.param("n_inference_step", 50)))
    n_actual = int(case.param("n_actual_inference_step"))
    start = schedule.edit_index(n_actual)
    t = schedule.timesteps[start]
    # `unet_feature_idx` is informational in these cases: the authors' apply_model always takes
    # the outputs of decoder stages 1 and 2 (up_blocks[1], up_blocks[2]) = dragexp indices 2, 3.
    feature_idx = [2, 3]

    latents = invert_all(NoisePredictor(unet, cond), x0, schedule)
    z_t = latents[n_actual]
    handles, targets = drag_points(inp["points_xy"].tolist(), size, size)
    drawn = inp.get("user_mask", inp.get("mask"))
    mask = user_mask(drawn if drawn is not None else torch.zeros(size), size)

    module, recorder, trace, mask_cb = _run_drag(case, unet, z_t, t, cond, handles, targets,
                                                 mask, schedule, feature_idx)
    target = module.target
    with torch.no_grad():
        _, f0 = target.initial_forward(module.problem, z_t)
        eps2, f2 = target.batch_forward(module.problem, z_t)
    final, gen = _gen(ReferenceAttentionUNet(unet), module.result, cond, uncond, schedule, start,
                      latents, case)
    out = _drag_traces(module, recorder, trace, mask_cb, prefix="drag_")
    out.update({
        "inversion_latents": torch.cat(latents),
        "handle_points_rc_init": handles,
        "target_points_rc": targets,
        "drag_timestep": torch.tensor([t], dtype=torch.int64),
        "drag_F0_latentres": concat_at_finest(f0),
        "drag_iter0_apply_input": torch.cat([z_t, z_t]),
        "drag_iter0_eps": eps2,
        "drag_iter0_feats_latentres": concat_at_finest(f2),
        "drag_updated_latent": module.result,
        "gen_latents": gen,
        "gen_final_latent": final,
    })
    out.update(_schedule_keys(schedule))
    return out
