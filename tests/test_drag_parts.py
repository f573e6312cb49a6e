"""Points, tracker, losses, feature taps, attention control and the split UNet."""

import pytest
import torch
import torch.nn.functional as F

from dragexp.core.attention import (ReferenceControl, attention_control, self_attention_layers,
                                    transformer_blocks)
from dragexp.core.features import FeatureTap, replace_output
from dragexp.drag.losses import (all_reached, mask_preservation_loss, motion_supervision_loss,
                                 sample_patch)
from dragexp.drag.points import clicks_to_grid, supervision_size
from dragexp.drag.trackers import BorderError, NearestFeatureTracker
from dragexp.methods.latent_drag.unet_split import UNetDecoder


def test_clicks_round_half_to_even():
    h, t = clicks_to_grid([[10, 41], [20, 43]], (128, 192), supervision_size((128, 192)))
    assert h.tolist() == [[20.0, 5.0]] and t.tolist() == [[22.0, 10.0]]
    assert supervision_size((341, 512)) == (170, 256)


def test_tracker_finds_moved_feature_and_clips():
    F0 = torch.zeros(1, 2, 10, 10)
    F0[0, :, 5, 5] = 1.0
    F1 = torch.zeros(1, 2, 10, 10)
    F1[0, :, 7, 3] = 1.0
    h0 = torch.tensor([[5.0, 5.0]])
    assert NearestFeatureTracker(3)(F0, F1, h0, h0).tolist() == [[7.0, 3.0]]
    # window clipped at the border: a handle on row 0 still searches rows 0..3
    F1b = torch.zeros(1, 2, 10, 10)
    F1b[0, :, 0, 9] = 1.0
    near = torch.tensor([[1.0, 8.0]])
    assert NearestFeatureTracker(3)(F0, F1b, h0, near).tolist() == [[0.0, 9.0]]
    with pytest.raises(BorderError, match="handle 0"):
        NearestFeatureTracker(3, border="reference")(F0, F1b, h0, near)


def test_sample_patch_is_bilinear():
    feat = torch.randn(1, 3, 9, 11)
    y, x = torch.tensor(2.3), torch.tensor(4.6)
    got = sample_patch(feat, y, x, 3, 3)
    # same sample through grid_sample (align_corners=True uses pixel centres at integers)
    ys = y + torch.arange(3.0)
    xs = x + torch.arange(3.0)
    gy, gx = torch.meshgrid(ys / 8 * 2 - 1, xs / 10 * 2 - 1, indexing="ij")
    ref = F.grid_sample(feat, torch.stack([gx, gy], -1)[None], align_corners=True)
    assert torch.allclose(got, ref, atol=1e-5)


def test_motion_loss_value_and_skip():
    feat = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    h = torch.tensor([[3.0, 3.0]])
    # moving one pixel right: the shifted patch is the patch + 1 everywhere -> 9 * mean|1| = 9
    assert float(motion_supervision_loss(feat, h, torch.tensor([[3.0, 6.0]]))) == pytest.approx(9.0)
    assert float(motion_supervision_loss(feat, h, torch.tensor([[3.0, 4.5]]))) == 0.0
    assert all_reached(h, torch.tensor([[3.0, 4.9]])) and not all_reached(h, torch.tensor([[3.0, 5.0]]))


def test_mask_loss_is_a_sum_over_protected_elements():
    a, b = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    m = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert float(mask_preservation_loss(a, b, m, 0.1)) == pytest.approx(0.1 * 4 * 3)


def test_feature_index_convention(tiny):
    unet = tiny.unet
    blocks = transformer_blocks(unet)
    assert len(blocks) == 16 and [b.region for b in blocks].count("up") == 9
    assert blocks[10].name.startswith("up_blocks.2") and blocks[15].name.startswith("up_blocks.3")
    x, text = torch.randn(1, 4, 8, 8), tiny.encode_prompt("x")
    with torch.no_grad(), FeatureTap(unet, range(5)) as tap:
        unet(x, 681, encoder_hidden_states=text)
    assert [tuple(f.shape[-2:]) for f in tap.features] == [(1, 1), (2, 2), (4, 4), (8, 8), (8, 8)]


def test_reference_control_leaves_reference_branch(tiny):
    unet = tiny.unet
    x = torch.randn(1, 4, 8, 8)
    batch = torch.cat([x, torch.randn(1, 4, 8, 8)])
    text = tiny.encode_prompt("x").expand(2, -1, -1)
    with torch.no_grad():
        plain = unet(batch, 681, encoder_hidden_states=text).sample
        ctl = ReferenceControl(self_attention_layers(unet, 10))
        with attention_control(unet, ctl):
            ref = unet(batch, 681, encoder_hidden_states=text).sample
            ctl.step = 0
            same = unet(torch.cat([x, x]), 681, encoder_hidden_states=text).sample
    assert torch.allclose(ref[0], plain[0], atol=1e-5)          # reference branch unchanged
    assert not torch.allclose(ref[1], plain[1], atol=1e-4)      # edited branch attends to ref
    assert torch.allclose(same[0], same[1], atol=1e-5)


def test_decoder_only_equals_full_forward(tiny):
    unet = tiny.unet
    for hw in ((8, 8), (9, 7)):
        x, text = torch.randn(1, 4, *hw), tiny.encode_prompt("x")
        with torch.no_grad():
            full = unet(x, 681, encoder_hidden_states=text).sample
            dec = UNetDecoder(unet, x, 681, text)
            assert torch.allclose(dec(dec.bottleneck), full, atol=1e-5)
            h = dec.bottleneck + 0.5
            with replace_output(unet.mid_block, h):
                swapped = unet(x, 681, encoder_hidden_states=text).sample
            assert torch.allclose(dec(h), swapped, atol=1e-5)


def test_decoder_from_a_later_feature(tiny):
    from dragexp.core.features import feature_module

    unet = tiny.unet
    x, text = torch.randn(1, 4, 9, 7), tiny.encode_prompt("x")
    with torch.no_grad():
        dec = UNetDecoder(unet, x, 681, text, start=2)
        assert torch.allclose(dec(dec.bottleneck), unet(x, 681, encoder_hidden_states=text).sample,
                              atol=1e-5)
        h = dec.bottleneck * 1.5
        with replace_output(feature_module(unet, 2), h):
            swapped = unet(x, 681, encoder_hidden_states=text).sample
        assert torch.allclose(dec(h), swapped, atol=1e-5)
    with pytest.raises(ValueError, match="optimised feature"):
        UNetDecoder(unet, x, 681, text, start=4)
