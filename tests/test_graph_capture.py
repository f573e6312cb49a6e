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


# -- captured optimisation steps (speed=graphs) ------------------------------------------------

def _graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def _captured_and_eager(make_module, callbacks):
    """(captured module, eager module, graphs compiled by the captured fit); a recompile
    across steps is an error."""
    from dragexp.modules.drag_optimisation import fit_drag
    from dragexp.performance.capture import StepCapture

    eager = fit_drag(make_module(None), callbacks(), progress=False, accelerator="cpu")
    torch._dynamo.reset()
    before = _graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        captured = fit_drag(make_module(StepCapture()), callbacks(), progress=False,
                            accelerator="cpu")
    return captured, eager, _graphs() - before


@pytest.mark.parametrize("kind", ["latent", "bottleneck", "easydrag_cached", "easydrag_batch"])
def test_drag_steps_are_two_graphs_without_recompiles(model, kind):
    """Each method's drag step compiles as one forward(+backward) graph and one optimiser-step
    graph, traced once for all the steps of the edit (points move, the tracker and the stop
    rule run between the graphs), and optimises what the eager steps optimise."""
    from callbacks import PointTracking, StopWhenReached
    from dragexp.core.features import concat_then_resize
    from dragexp.core.schedule import DDIMSchedule
    from dragexp.drag.targets import LatentTarget
    from dragexp.methods.easydrag.reference import ReferenceLatentTarget
    from dragexp.methods.latent_drag.bottleneck import BottleneckTarget
    from dragexp.modules.drag_optimisation import (CosineDragObjective, DragObjective,
                                                   DragOptimisation)

    unet, text = model
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 4:28, 4:28] = 1
    h, t = torch.tensor([[10.0, 8.0], [20.0, 20.0]]), torch.tensor([[10.0, 24.0], [12.0, 20.0]])
    easy = kind.startswith("easydrag")

    def make(capture):
        target = {"latent": LatentTarget, "bottleneck": BottleneckTarget}.get(kind)
        target = target() if target else ReferenceLatentTarget(
            True, cache_reference=kind == "easydrag_cached")
        return DragOptimisation(unet, target, z, 681, text, h, t, mask, DDIMSchedule.sd15(),
                                [2, 3] if easy else [3],
                                CosineDragObjective() if easy else DragObjective(), 0.01, 4,
                                compose_features=concat_then_resize if easy else None,
                                capture=capture)

    from dragexp.performance.lean_unet import set_lean

    set_lean(unet, kind == "latent")     # the fast path's lean UNet traces as well
    try:
        captured, eager, graphs = _captured_and_eager(
            make, lambda: [] if easy else [PointTracking(), StopWhenReached()])
    finally:
        set_lean(unet, False)
    assert graphs == 2
    assert captured.num_steps == eager.num_steps == 4
    assert torch.equal(captured.handles, eager.handles)
    assert torch.allclose(captured.result, eager.result, atol=1e-5, rtol=1e-4)
    assert not unet._forward_hooks and not any(m._forward_hooks for m in unet.modules())
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())


def test_lora_step_is_two_graphs_without_recompiles():
    """LoRA fine-tuning's step (noising, UNet with the adapter, MSE; then AdamW) compiles as
    one forward(+backward) graph and one optimiser graph for all steps, with the eager
    losses and weights."""
    import copy

    import numpy as np

    from dragexp.core.lora import add_lora
    from dragexp.modules.lora_finetune import LoRAFineTune, RandomDraws, fit_lora
    from dragexp.performance.capture import StepCapture

    tiny = build_tiny(0, 64)
    emb = tiny.encode_prompt("a red disc")
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    runs = {}
    for capture in (None, StepCapture()):
        unet = copy.deepcopy(tiny.unet)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            add_lora(unet, rank=4)
        module = LoRAFineTune(unet, tiny.vae, emb, image, rank=4, lr=1e-2, steps=3,
                              batch_size=2, resolution=64, draws=RandomDraws(5), prefetch=True,
                              capture=capture)
        torch._dynamo.reset()
        before = _graphs()
        with torch._dynamo.config.patch(error_on_recompile=True):
            fit_lora(module, progress=False, trainer_kwargs=dict(accelerator="cpu"))
        runs[capture is not None] = (module.final_lora_state, float(module.last_step["loss"]),
                                     _graphs() - before)
    assert runs[True][2] == 2 and runs[False][2] == 0
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-4)
    worst = max((runs[True][0][k] - v).abs().max().item() for k, v in runs[False][0].items())
    print("max LoRA weight difference", worst)
    assert worst < 1e-3 * 1e-2 * 3   # a thousandth of what 3 Adam steps of lr 1e-2 can move


# -- captured UNet loops: inversion, denoising, reference guidance -----------------------------

def _methods():
    from dragexp.methods.easydrag.method import EasyDragMethod
    from dragexp.methods.latent_drag.method import LatentDragMethod

    return {
        "dragdiffusion": lambda: LatentDragMethod(lora_steps=0, n_inference_step=10,
                                                  n_pix_step=3),
        # the bottleneck replaces the mid block for the first steps only: the gate flips
        "dragnoise": lambda: LatentDragMethod(
            name="dragnoise", lora_steps=0, n_inference_step=10, n_pix_step=3,
            target="bottleneck", mask_term="always",
            denoise=dict(reference_control=False, end_step=2)),
        # reference guidance for the last 4 of 7 steps: batch 1, then [x, x, ref]
        "easydrag": lambda: EasyDragMethod(n_inference_step=10, n_actual_inference_step=7,
                                           n_pix_step=3, ref_start_step=4),
    }


@pytest.mark.parametrize("name", ["dragdiffusion", "dragnoise", "easydrag"])
def test_an_edit_under_speed_graphs_compiles_each_kind_of_step_once(tiny, name):
    """``speed=graphs`` on a whole edit: the inversion's 7 steps, the drag's 3 and the
    denoising's 7 compile to 4 graphs in all (one UNet call of each kind, the drag step's
    forward+backward and its optimiser step), however many steps run: the step gates
    (DragDiffusion's reference control, DragNoise's bottleneck, EasyDrag's reference
    guidance) are tensors or shapes, never a value baked into a graph. The edited image is the
    eager fast path's."""
    from dataclasses import replace

    import numpy as np

    from dragexp.data.toybench import ToyBench
    from dragexp.methods.base import EditContext
    from dragexp.performance.speed import SpeedSettings

    sample = ToyBench(1, 0, (64, 64))[0]
    fast = SpeedSettings(cache_reference=True, batch_guidance=True)
    images, graphs = {}, {}
    for graphed in (False, True):
        torch._dynamo.reset()
        before = _graphs()
        torch.manual_seed(0)
        # dynamo's graphs without AOTAutograd's (what breaks or recompiles is dynamo's business)
        speed = replace(fast, graphs=graphed, graphs_backend="eager")
        result = _methods()[name]().edit(sample, tiny, EditContext(speed=speed, progress=False))
        images[graphed], graphs[graphed] = result.image.astype(int), _graphs() - before
    assert graphs == {False: 0, True: 4}
    assert np.abs(images[True] - images[False]).max() <= 2
    assert not any(m._forward_hooks for m in tiny.unet.modules())
    assert "forward" not in tiny.unet.__dict__
