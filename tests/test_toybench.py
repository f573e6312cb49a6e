"""toybench: the procedural world, its seeded drag samples with ground truth, and the
ground-truth metrics of an edit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dragexp.data import SampleError, ToyBench
from dragexp.data.toyworld import Scene, ToyObject, caption, random_scene, render
from dragexp.evaluation.ground_truth import ground_truth_metrics, object_offset


def _disc_scene(dx: float = 0.0, dy: float = 0.0) -> tuple[Scene, ToyObject]:
    obj = ToyObject("disc", "red", 0.4, 0.5, 0.12, texture="stripes", period=0.5)
    obj = obj.moved(dx, dy, 128, 128)
    return Scene("blue", "white", 0.3, "plain", (obj,)), obj


def test_same_seed_same_samples_and_seed_changes_them():
    a, b = ToyBench(count=3, seed=5), ToyBench(count=3, seed=5)
    for x, y in zip(a, b):
        assert x.name == y.name and x.points == y.points and x.prompt == y.prompt
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
        assert np.array_equal(x.extras["ground_truth"]["image"], y.extras["ground_truth"]["image"])
    c = ToyBench(count=3, seed=6)
    assert not np.array_equal(a[0].image, c[0].image)


@pytest.mark.parametrize("size", [(128, 128), (96, 160), (72, 56)])
def test_translation_truth_is_the_object_moved_by_the_drag(size):
    for s in ToyBench(count=4, seed=1, size=size):
        truth = s.extras["ground_truth"]
        assert s.image.shape[:2] == size and truth["image"].shape == s.image.shape
        # Nothing outside the mask changes in the truth: the other objects are clear of the edit.
        outside = s.mask == 0
        assert np.array_equal(truth["image"][outside], s.image[outside])
        (hx, hy), (tx, ty) = s.handles[0], s.targets[0]
        dx, dy = object_offset(s.image, truth["image"], truth["object_alpha"], search=64)
        # Matching the true object in the source finds it one drag back from its true place.
        assert math.hypot(dx + (tx - hx), dy + (ty - hy)) < 0.5, (s.name, dx, dy, tx - hx, ty - hy)
        assert 0.12 * min(size) - 1 <= math.hypot(tx - hx, ty - hy) <= 0.22 * min(size) + 1


def test_stretch_and_rotate_samples_and_their_names():
    bench = ToyBench(count=6, seed=2, edits=["translate", "stretch", "rotate"])
    assert bench.names == ["000_translate", "001_stretch", "002_rotate", "003_translate",
                           "004_stretch", "005_rotate"]
    for s in bench:
        truth = s.extras["ground_truth"]
        assert truth["edit"] == s.category
        changed = np.any(truth["image"] != s.image, axis=-1)
        assert changed.any() and not changed[s.mask == 0].any()
        assert truth["object"] in {"translate": ("disc", "box", "star", "ring"),
                                   "stretch": ("disc", "box"),
                                   "rotate": ("box", "star")}[s.category]


def test_object_offset_finds_a_sub_pixel_move():
    scene, _ = _disc_scene()
    moved, obj = _disc_scene(4.5, -2.25)
    from dragexp.data.toyworld import render_object

    truth = render(moved, 128, 128)
    _, alpha = render_object(obj, 128, 128)
    dx, dy = object_offset(render(scene, 128, 128), truth, alpha, search=16)
    assert abs(dx + 4.5) < 0.3 and abs(dy - 2.25) < 0.3


def test_metrics_of_the_truth_itself_and_of_no_edit():
    s = ToyBench(count=1, seed=3)[0]
    truth = s.extras["ground_truth"]
    perfect = ground_truth_metrics(truth["image"], s.image, s.mask, truth)
    assert perfect["object_error_px"] < 0.05
    assert perfect["psnr_gt"] == math.inf and perfect["ssim_gt"] == pytest.approx(1.0)
    assert perfect["mae_outside_mask"] == 0.0
    none = ground_truth_metrics(s.image, s.image, s.mask, truth)
    d = math.dist(s.handles[0], s.targets[0])
    assert none["object_error_px"] == pytest.approx(d, abs=0.5)
    assert none["psnr_gt"] < 40 and none["psnr_outside_mask"] == math.inf
    # An output that wipes the object away is far from the truth and changes nothing outside.
    wiped = s.image.copy()
    wiped[s.mask > 0] = s.image[0, 0]
    assert ground_truth_metrics(wiped, s.image, s.mask, truth)["psnr_gt"] < none["psnr_gt"] + 3


def test_bad_parameters_name_themselves():
    with pytest.raises(ValueError, match="data.edits"):
        ToyBench(edits=["shear"])
    with pytest.raises(ValueError, match="data.count"):
        ToyBench(count=-1)
    with pytest.raises(ValueError, match="data.size"):
        ToyBench(size=(16, 16))
    with pytest.raises(IndexError):
        ToyBench(count=2)[2]
    assert issubclass(SampleError, ValueError)


def test_caption_names_every_object():
    scene = random_scene(np.random.default_rng(4), max_objects=3)
    text = caption(scene)
    for o in scene.objects:
        assert f"{o.colour} {o.shape}" in text
    assert text.endswith(f"on {'an' if scene.bg[0] in 'aeiou' else 'a'} {scene.bg} background")


def test_world_tokenizer_makes_each_world_word_one_token():
    from dragexp.models.toy_training import _world_words, build_world_tokenizer

    tok = build_world_tokenizer()
    assert all(len(tok.tokenize(w)) == 1 for w in _world_words())
    assert tok.tokenize("a striped red disc on a green background") == [
        "a</w>", "striped</w>", "red</w>", "disc</w>", "on</w>", "a</w>", "green</w>",
        "background</w>"]
    assert len(tok.tokenize("zebra")) > 1   # any other text still tokenizes
