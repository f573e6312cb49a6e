"""The fast path's lean UNet (dragexp.performance.lean_unet) computes the plain UNet's function,
with gradients, under LoRA and after a merge, in the number of launches it claims."""

from __future__ import annotations

import pytest
import torch

from dragexp.core.attention import ReferenceControl, attention_control, self_attention_layers
from dragexp.core.lora import add_lora, merged_lora, remove_lora
from dragexp.models.tiny import build_tiny
from dragexp.performance.lean_unet import set_lean
from dragexp.performance.profiling import unet_forward_work


@pytest.fixture()
def bundle():
    return build_tiny(0, 64)


def _inputs(bundle, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), bundle.encode_prompt("a red disc").expand(2, -1, -1)


def _eps(unet, x, text, t=681):
    return unet(x, torch.tensor(t), encoder_hidden_states=text, return_dict=False)[0]


def _counts(unet):
    attn = [m for n, m in unet.named_modules() if n.endswith(("attn1", "attn2"))]
    resnets = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    return len(attn) // 2, len(resnets)


def test_same_function_and_gradient_with_fewer_launches(bundle):
    unet = bundle.unet
    x, text = _inputs(bundle)
    x.requires_grad_()
    plain = _eps(unet, x, text)
    (g_plain,) = torch.autograd.grad(plain.square().sum(), x)
    before = unet_forward_work(unet, (8, 8), text[:1])

    set_lean(unet, True)
    after = unet_forward_work(unet, (8, 8), text[:1])
    for _ in range(2):   # the second call reads the cached cross-attention keys/values
        lean = _eps(unet, x, text)
        (g_lean,) = torch.autograd.grad(lean.square().sum(), x)
        assert torch.allclose(lean, plain, atol=1e-6, rtol=1e-5)
        assert torch.allclose(g_lean, g_plain, atol=1e-5, rtol=1e-4)

    # per transformer block: QKV 3 -> 1, cross K/V 2 -> 0 (cached), two divisions by 1.0;
    # per resnet: a division by 1.0 and SiLU(temb), which all but one resnet stop computing
    blocks, resnets = _counts(unet)
    assert before.launches - after.launches == blocks * (2 + 2 + 2) + resnets + (resnets - 1)
    assert after.by_op["mm"] == before.by_op["mm"] - 4 * blocks

    set_lean(unet, False)
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())
    assert unet_forward_work(unet, (8, 8), text[:1]).by_op == before.by_op
    assert torch.equal(_eps(unet, x, text), plain)


def test_controllers_and_a_changed_prompt(bundle):
    """Reference control still redirects keys/values of the fused projections, and an
    embedding changed in place gets new cross-attention keys/values, not the cached ones."""
    unet = bundle.unet
    x, text = _inputs(bundle, 1)
    ctl = ReferenceControl(self_attention_layers(unet, 2))
    with attention_control(unet, ctl):
        ref = _eps(unet, x, text)
    text2 = text.clone()
    plain2 = _eps(unet, x, text2 * 0.5)
    set_lean(unet, True)
    with attention_control(unet, ctl):
        assert torch.allclose(_eps(unet, x, text), ref, atol=1e-6, rtol=1e-5)
    _eps(unet, x, text2)
    text2.mul_(0.5)
    assert torch.allclose(_eps(unet, x, text2), plain2, atol=1e-6, rtol=1e-5)


def test_lora_training_and_merged_lora(bundle):
    """A trainable adapter is computed unfused (its gradient reaches the LoRA weights); inside
    ``merged_lora`` the merged weights are fused, and the base weights are fused again after."""
    unet = bundle.unet
    x, text = _inputs(bundle, 2)
    params = add_lora(unet, rank=4)
    with torch.no_grad():
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    out = _eps(unet, x, text)
    grads = torch.autograd.grad(out.square().sum(), params)
    set_lean(unet, True)
    lean = _eps(unet, x, text)
    lean_grads = torch.autograd.grad(lean.square().sum(), params)
    assert torch.allclose(lean, out, atol=1e-6, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(lean_grads, grads))

    with merged_lora(unet), torch.no_grad():
        merged = _eps(unet, x, text)
        assert unet_forward_work(unet, (8, 8), text[:1]).by_op["mm"] == _counts(unet)[0] * 2
    assert torch.allclose(merged, out, atol=1e-5, rtol=1e-4)
    remove_lora(unet)
    set_lean(unet, False)
    base = _eps(unet, x, text)
    set_lean(unet, True)
    assert torch.allclose(_eps(unet, x, text), base, atol=1e-6, rtol=1e-5)
