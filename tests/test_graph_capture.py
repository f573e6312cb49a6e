"""The UNet calls of every method trace as one graph each (torch.compile with fullgraph=True,
so a graph break fails the test): the ground for compiling or capturing them. On the tiny
model, with the eager backend (tracing, not code generation); outputs are checked against
eager."""

from __future__ import annotations

import pytest
import torch

from dragexp.core.attention import (IndexedReference, ReferenceControl, attention_control,
                                    self_attention_control, self_attention_layers)
from dragexp.core.features import FeatureTap
from dragexp.methods.dragondiffusion.memory_bank import (DragonAttentionControl, MemoryBank,
                                                         decoder_self_attention_layers)
from dragexp.models.tiny import build_tiny


@pytest.fixture(scope="module")
def model():
    b = build_tiny(0, 64)
    return b.unet, b.encode_prompt("a red disc")


def _one_graph(fn, *args):
    """``fn`` compiles with ``fullgraph=True`` (a graph break raises) and matches eager."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(*args), fn(*args), atol=1e-5)


def _call(unet, x, text):
    return unet(x, torch.tensor(681), encoder_hidden_states=text, return_dict=False)[0]


def test_plain_forward_and_feature_taps_are_one_graph(model):
    unet, text = model
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    _one_graph(lambda x, text: _call(unet, x, text), x, text)
    # The taps are entered once per edit, outside the step; the hooks run inside the graph.
    with FeatureTap(unet, [0, 3]) as tap:
        def tapped(x, text):
            eps = _call(unet, x, text)
            return eps + tap.features[1].mean() + tap.features[0].mean()

        _one_graph(tapped, x, text)


def test_reference_controlled_forwards_are_one_graph(model):
    """DragDiffusion's reference-latent control, EasyDrag's indexed reference attention and
    DragonDiffusion's memory-bank controller, each inside the traced call."""
    unet, text = model
    x2 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text2 = text.expand(2, -1, -1)
    with attention_control(unet, ReferenceControl(self_attention_layers(unet, 10))):
        _one_graph(lambda x, t: _call(unet, x, t), x2, text2)
    x3 = torch.cat([x2, x2[:1]])
    with self_attention_control(unet, IndexedReference([0, 2, 2])):
        _one_graph(lambda x, t: _call(unet, x, t), x3, text.expand(3, -1, -1))
    bank = MemoryBank()
    ctl = DragonAttentionControl(decoder_self_attention_layers(unet), bank, "drag", (0, None))
    with attention_control(unet, ctl):
        ctl.set("record", 0)
        _call(unet, x2[:1], text)         # fills the bank for step 0
        ctl.set("sample", 0)
        _one_graph(lambda x, t: _call(unet, x, t), x2[:1], text)
