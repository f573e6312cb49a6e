"""Adapters for the DragDiffusion / DragNoise loop and denoising cases.

Each adapter translates a case's inputs into the calls :mod:`dragexp.methods.latent_drag`
makes for a real edit and collects what the case expects. Point and mask conversions, the
inversion, the optimisation (a real Trainer with the real callbacks) and the denoising are the
method's own functions.
"""

from __future__ import annotations

import torch

from dragexp.callbacks.drag import DragCallback, PointTracking, StopWhenReached, TrajectoryRecorder
from dragexp.modules.drag_optimisation import DragObjective, DragOptimisation, fit_drag

from ..core.features import FeatureTap
from ..core.schedule import DDIMSchedule
from ..drag.targets import LatentTarget
from ..drag.trackers import NearestFeatureTracker
from ..methods.latent_drag.method import (DenoiseSettings, denoise, invert, supervision_mask,
                                          supervision_points)
from .case import Case
from .registry import adapter


def self_check(case: Case, unet) -> dict[str, torch.Tensor]:
    """check_eps and check_feat_0..4: the plain UNet forward and its five feature taps."""
    out = {}
    if "check_input" not in case.inputs:
        return out
    x, t, text = case.inputs["check_input"], case.inputs["check_t"], case.inputs["check_text"]
    with torch.no_grad(), FeatureTap(unet, range(5)) as tap:
        out["check_eps"] = unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
    for k, f in enumerate(tap.features):
        out[f"check_feat_{k}"] = f
    return out


class _StepRecorder(DragCallback):
    """Collects the per-step traces the loop cases store (runs after the tracking and stop)."""

    drag_hook_order = 90

    def __init__(self):
        self.eps0 = None
        self.params: list[torch.Tensor] = []
        self.used: list[torch.Tensor] = []
        self.losses: list[float] = []

    def on_drag_features(self, trainer, module, state):
        if state.step == 0:
            self.eps0 = state.eps.detach().clone()
        # The reference appends to h_features before tracking and the stop check, so the
        # stopping iteration's bottleneck is a row too (num_steps + 1 rows when stopped).
        self.used.append(module.param.detach().clone())

    def on_drag_step_end(self, trainer, module, state):
        self.params.append(module.param.detach().clone())
        self.losses.append(float(state.loss))


def run_latent_loop(case: Case, target, objective: DragObjective, tracker_border: str,
                    denoise_settings: DenoiseSettings) -> dict[str, torch.Tensor]:
    """The whole real-image pipeline of a loop case, through the method's stage functions."""
    unet, _ = case.build_unet()
    out = self_check(case, unet)
    latent0 = case.inputs["latent_0"].float()
    text = case.inputs["text_embeddings"].float()
    mask = case.inputs["mask"]
    H, W = mask.shape[-2:]
    sup_hw = (int(case.param("sup_res_h")), int(case.param("sup_res_w")))
    n_steps = int(case.param("n_inference_step"))
    schedule = DDIMSchedule.sd15(n_steps)
    n_actual = int(case.param("n_actual_inference_step"))

    handles, targets = supervision_points(case.inputs["points_xy"].tolist(), (H, W), sup_hw)
    mask_sup = supervision_mask(mask, sup_hw)
    latents = invert(unet, latent0, text, schedule, n_actual)
    start = schedule.edit_index(n_actual)
    t = schedule.timesteps[start]
    z_t = latents[-1]

    recorder = TrajectoryRecorder()
    steps = _StepRecorder()
    callbacks = [PointTracking(NearestFeatureTracker(int(case.param("r_p")), tracker_border)),
                 StopWhenReached(), recorder, steps]
    module = DragOptimisation(unet, target, z_t, t, text, handles, targets, mask_sup, schedule,
                              case.param("unet_feature_idx"), objective,
                              float(case.param("lr")), int(case.param("n_pix_step")))
    fit_drag(module, callbacks, precision="32-true", accelerator="cpu", progress=False)
    edited, bottleneck = module.outcome()

    denoised = [torch.cat([z_t, edited])]
    injected: list[int] = []
    timesteps: list[int] = []

    def hook(predictor):
        def eps_fn(x, t_, i):
            eps = predictor(x, t_, i)
            injected.append(int(predictor.last_injected))
            timesteps.append(int(t_))
            return eps
        return eps_fn

    denoise(unet, denoised[0], text, schedule, start, denoise_settings, bottleneck=bottleneck,
            on_step=lambda i, t_, x: denoised.append(x), predictor_hook=hook)
    den = torch.stack(denoised)  # [steps+1, 2, 4, h, w]

    n_done = module.num_steps
    out.update({
        "mask_supres": mask_sup,
        "handle_points_rc": handles,
        "target_points_rc": targets,
        "inversion_latents": torch.cat(latents),
        "inverted_latent": z_t,
        "drag_timestep": torch.tensor(t, dtype=torch.int64),
        "F0": module.features_init,
        "eps_F0": module.eps_init,
        "x_prev_0": module.x_prev_init,
        "eps_iter0": steps.eps0,
        "num_steps": torch.tensor(n_done, dtype=torch.int32),
        "loss_trajectory": torch.tensor(steps.losses, dtype=torch.float32),
        "handle_trajectory": torch.tensor(recorder.handles, dtype=torch.float32),
        "stopped_early": torch.tensor(int(module.stopped_early), dtype=torch.int32),
        "denoise_latents": den[:, 1],
        "denoise_latents_ref_branch": den[:, 0],
        "final_latent": den[-1, 1:2],
        "denoise_timesteps": torch.tensor(timesteps, dtype=torch.int64),
        "bottleneck_injected": torch.tensor(injected, dtype=torch.int32),
        "num_att_layers": torch.tensor(len(unet.attn_processors), dtype=torch.int32),
    })
    after = torch.cat(steps.params) if steps.params else module.result[:0]
    if target.name == "latent":
        out["latent_after_step"] = after
        out["optimized_latent"] = module.result
    else:
        out["bottleneck_before"] = module.param_init
        out["bottleneck_after_step"] = after
        out["bottleneck_per_iteration"] = (torch.cat(steps.used) if steps.used
                                           else module.result[:0])
        out["optimized_bottleneck"] = module.result
        out["latent_returned_by_update"] = edited
        out["injected_bottleneck"] = bottleneck.expand(2, *bottleneck.shape[1:]).clone()
    return out


@adapter("dragdiffusion.loop_real")
def dragdiffusion_loop_real(case: Case) -> dict[str, torch.Tensor]:
    settings = DenoiseSettings(reference_control=True, start_step=int(case.param("start_step")),
                               start_layer=int(case.param("start_layer")),
                               total_steps=int(case.param("n_inference_step")))
    objective = DragObjective(int(case.param("r_m")), float(case.param("lam")), "if_masked")
    return run_latent_loop(case, LatentTarget(), objective, "clip", settings)


@adapter("dragdiffusion.fn_masactrl_cfg")
def dragdiffusion_masactrl_cfg(case: Case) -> dict[str, torch.Tensor]:
    """Generated-image denoising: CFG batch [u_ref, u_edit, c_ref, c_edit] with mutual attention."""
    unet, _ = case.build_unet()
    out = self_check(case, unet)
    n_steps = int(case.param("n_inference_step"))
    schedule = DDIMSchedule.sd15(n_steps)
    n_actual = int(case.param("n_actual_inference_step"))
    start = schedule.edit_index(n_actual)
    x = torch.cat([case.inputs["latent_ref"], case.inputs["latent_edit"]]).float()
    settings = DenoiseSettings(reference_control=True, start_step=int(case.param("start_step")),
                               start_layer=int(case.param("start_layer")),
                               total_steps=int(case.param("total_steps", n_steps)))
    lat, ts, eps_raw = [x], [], []

    def hook(predictor):
        def eps_fn(x_, t_, i):
            eps = predictor(x_, t_, i)
            ts.append(int(t_))
            eps_raw.append(predictor.last_raw_eps.detach().clone())
            return eps
        return eps_fn

    denoise(unet, x, case.inputs["text_embeddings"].float(), schedule, start, settings,
            uncond=case.inputs["neg_text_embeddings"].float(),
            guidance=float(case.param("guidance_scale")),
            on_step=lambda i, t_, x_: lat.append(x_), predictor_hook=hook)
    out.update({
        "denoise_latents": torch.stack(lat),
        "unet_timesteps": torch.tensor(ts, dtype=torch.int64),
        "unet_eps": torch.stack(eps_raw),
        "final_latent_edit": lat[-1][1:2],
        "num_att_layers": torch.tensor(len(unet.attn_processors), dtype=torch.int32),
    })
    return out


def _dragnoise(case: Case) -> dict[str, torch.Tensor]:
    from ..methods.latent_drag.bottleneck import BottleneckTarget

    settings = DenoiseSettings(reference_control=False, end_step=int(case.param("end_step")))
    objective = DragObjective(int(case.param("r_m")), float(case.param("lam")), "always")
    return run_latent_loop(case, BottleneckTarget(), objective, "reference", settings)


adapter("dragnoise.loop_real")(_dragnoise)
adapter("dragnoise.loop_moving")(_dragnoise)
