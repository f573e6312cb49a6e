"""The shared DDIM schedule and its two moves, pinned to hard-coded values."""

import torch
from diffusers import DDIMScheduler

from dragexp.core.schedule import SD_SCHEDULER_CONFIG, DDIMSchedule, ddim_step, inversion_step


def test_timesteps_and_edit_step():
    s = DDIMSchedule.sd15()
    assert s.timesteps[:3] == [981, 961, 941] and s.timesteps[-1] == 1
    assert s.num_edit_steps(0.7) == 35
    assert s.edit_index(35) == 15 and s.edit_timestep(35) == 681
    assert s.inversion_timesteps(35)[:2] == [1, 21] and s.inversion_timesteps(35)[-1] == 681


def test_alphas_match_diffusers_and_fallback():
    s = DDIMSchedule.sd15()
    ref = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod)
    assert abs(float(s.alpha_bar(-19)) - 0.99915) < 1e-5      # set_alpha_to_one=False
    assert abs(float(s.alpha_bar(681)) - 0.094637) < 1e-5


def test_ddim_step_equals_diffusers_step():
    s = DDIMSchedule.sd15()
    ref = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    ref.set_timesteps(50)
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t in (681, 21, 1):
        assert torch.allclose(ddim_step(eps, t, x, s), ref.step(eps, t, x).prev_sample, atol=1e-6)


def test_inversion_step_inverts_ddim_step_for_constant_eps():
    s = DDIMSchedule.sd15()
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    up = inversion_step(eps, 681, x, s)
    assert torch.allclose(ddim_step(eps, 681, up, s), x, atol=1e-5)


def test_first_inversion_step_uses_alpha_bar_zero():
    s = DDIMSchedule.sd15()
    x, eps = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    # eps = 0: x0 = x / sqrt(a_cur), x_next = sqrt(a_next) x0 with a_cur = alpha_bar[0].
    expected = (s.alphas_cumprod[1] / s.alphas_cumprod[0]) ** 0.5
    assert torch.allclose(inversion_step(eps, 1, x, s), expected.reshape(1, 1, 1, 1))
