"""DragBench evaluation: known answers, the protocol's quirks, the loader on the real data, the
public conformance cases, and ``scripts/evaluate.py`` end to end (docs/evaluation.md)."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CONFORMANCE, SHARED, conformance_cases, require_shared

ROOT = Path(__file__).resolve().parents[1]
DRAGBENCH = SHARED / "dragbench"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _write_bench(root: Path, specs) -> None:
    """A small folder in the DragBench layout: specs = [(name, (H, W), points_xy, prompt)]."""
    rng = np.random.default_rng(0)
    for name, (h, w), pts, prompt in specs:
        d = root / name
        d.mkdir(parents=True)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(d / "original_image.png")
        meta = dict(prompt=prompt, points=[list(p) for p in pts], mask=np.zeros((h, w), np.uint8))
        (d / "meta_data.pkl").write_bytes(pickle.dumps(meta, protocol=4))


SPECS = [
    ("animals/a1", (48, 64), [(10, 12), (30, 20)], "a cat"),
    ("animals/a2", (40, 40), [(5, 5), (9, 8), (30, 30), (20, 33)], "a dog"),
    ("land_scape/l1", (37, 53), [(40, 30), (12, 3)], "a hill"),
]


def _mean_handle_target(specs) -> float:
    d = [np.hypot(p[0] - q[0], p[1] - q[1]) for _, _, pts, _ in specs
         for p, q in zip(pts[0::2], pts[1::2])]
    return float(np.float32(np.mean(np.asarray(d, np.float32))))


# ------------------------------------------------------------------------------ known answers

def test_signed_unit_formulas_agree():
    from dragexp.evaluation.resize import to_signed_unit

    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2)
    a = to_signed_unit(x)
    b = torch.from_numpy(x).float().permute(2, 0, 1)[None] / 127.5 - 1
    assert torch.equal(a, b)  # the two scripts' normalisations agree bit for bit


def test_identical_images_give_lpips_zero():
    from dragexp.evaluation.lpips_if import build_lpips, lpips_distance
    from dragexp.evaluation.metrics import score_sample

    net = build_lpips("random", seed=0)
    img = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    assert float(lpips_distance(net, img, img)) == 0.0
    other = np.roll(img, 5, axis=1)
    assert float(lpips_distance(net, img, other)) > 0
    sc = score_sample(img, img.copy(), [(1, 1), (2, 2)], "", None, net, None)
    assert sc.if_ == 1.0 and torch.isnan(sc.clip_sim)


def test_cosine_equals_torch_cosine_similarity_bitwise():
    from dragexp.evaluation.matching import match_handles, unit_features

    g = torch.Generator().manual_seed(0)
    for c, h, w in [(32, 37, 53), (5, 64, 48)]:
        src = F.interpolate(torch.randn(1, c, 3, 4, generator=g), (h, w), mode="bilinear")
        drg = F.interpolate(torch.randn(1, c, 3, 4, generator=g), (h, w), mode="bilinear")
        r, col = h // 2, w // 3
        ref = F.cosine_similarity(src[0, :, r, col].view(1, c, 1, 1), drg, dim=1, eps=1e-8)
        v = src[0, :, r, col].view(1, c, 1, 1)
        mine = ((v / torch.linalg.vector_norm(v, 2, dim=1, keepdim=True).clamp_min(1e-8))
                * unit_features(drg)).sum(1)
        assert torch.equal(ref, mine)
        m = match_handles(src, drg, torch.tensor([[r, col]]))
        flat = int(ref[0].numpy().argmax())
        assert m.match_rc.tolist() == [[flat // w, flat % w]]


def test_exact_position_features_give_true_pixel_distance():
    """Content moved by (dy, dx): each handle matches handle + d; distance = |target - match|."""
    from dragexp.evaluation.dift import positional_features
    from dragexp.evaluation.matching import match_handles, pair_distances, points_rc

    h, w, dy, dx = 61, 83, 7, -11
    src = positional_features(h, w)
    drg = torch.roll(src, shifts=(dy, dx), dims=(2, 3))  # the feature of pixel p now at p + d
    pts = [(40, 20), (50, 30), (60, 40), (10, 45), (33, 33), (70, 5)]
    handles, targets = points_rc(pts)
    m = match_handles(src, drg, handles)
    assert m.match_rc.tolist() == [[r + dy, c + dx] for r, c in handles.tolist()]
    d = pair_distances(targets, m.match_rc)
    true = [np.hypot(t[0] - (hh[0] + dy), t[1] - (hh[1] + dx)) for hh, t in
            zip(handles.tolist(), targets.tolist())]
    assert np.allclose(d.numpy(), true, atol=1e-5)
    assert m.ties.tolist() == [1, 1, 1]


def test_do_nothing_gives_mean_handle_target_distance(tmp_path):
    from dragexp.data import DragBenchSamples
    from dragexp.evaluation.dift import ExactPositionFeaturizer
    from dragexp.evaluation.runner import Evaluator, resolve_results

    _write_bench(tmp_path, SPECS)
    ev = Evaluator(ExactPositionFeaturizer(), progress=False)
    fe = ev.evaluate(DragBenchSamples(tmp_path), resolve_results("do_nothing")[0])
    o = fe.overall()
    assert o["n_pairs"] == 4 and o["n_samples"] == 3
    assert o["md"] == pytest.approx(_mean_handle_target(SPECS), abs=1e-4)
    # per sample the same holds: the handles match themselves
    for s in fe.scores:
        pts = dict((n, p) for n, _, p, _ in SPECS)[s.name]
        assert s.matches.match_xy.tolist() == [list(p) for p in pts[0::2]]


def test_do_nothing_on_dragbench_subset_is_mean_handle_target_distance():
    require_shared(DRAGBENCH)
    from dragexp.data import DragBenchSamples
    from dragexp.evaluation.dift import ExactPositionFeaturizer
    from dragexp.evaluation.runner import Evaluator, resolve_results

    data = DragBenchSamples(DRAGBENCH, per_category=1)
    fe = Evaluator(ExactPositionFeaturizer(), progress=False).evaluate(
        data, resolve_results("do_nothing")[0])
    pairs = [(h, t) for s in data for h, t in zip(s.handles, s.targets)]
    expect = np.mean([np.hypot(h[0] - t[0], h[1] - t[1]) for h, t in pairs])
    assert fe.overall()["n_pairs"] == len(pairs)
    assert fe.overall()["md"] == pytest.approx(expect, abs=1e-3)


# ------------------------------------------------------------------------------ randomness

def test_sample_seed_is_stable_and_order_free(tmp_path):
    from dragexp.data import DragBenchSamples
    from dragexp.evaluation.dift import build_tiny_dift, DiftFeaturizer
    from dragexp.evaluation.metrics import sample_seed
    from dragexp.evaluation.runner import Evaluator, resolve_results

    # a pure function of the text: same value on every machine and Python version
    assert sample_seed(42, "animals/a1", "source") == 1251805175958966832
    assert sample_seed(42, "animals/a1", "source") != sample_seed(42, "animals/a1", "edited")
    _write_bench(tmp_path, SPECS)
    dift = DiftFeaturizer(build_tiny_dift(0), ensemble_size=2, attention_slicing=None)
    data = DragBenchSamples(tmp_path)
    folder = resolve_results("do_nothing")[0]
    full = Evaluator(dift, progress=False).evaluate(data, folder)
    alone = Evaluator(dift, progress=False).evaluate(data, folder, names=["land_scape/l1"])
    a = next(s for s in full.scores if s.name == "land_scape/l1")
    assert torch.equal(a.dist, alone.scores[0].dist)
    assert torch.equal(a.matches.cos_max, alone.scores[0].matches.cos_max)
    # the authors' global stream: a sample's noise depends on what came before it
    auth1 = Evaluator(dift, noise="authors", progress=False).evaluate(data, folder)
    auth2 = Evaluator(dift, noise="authors", progress=False).evaluate(data, folder)
    # the authors' category list puts land_scape before animals; os.listdir order inside
    assert auth1.scores[0].name == "land_scape/l1"
    assert {s.name for s in auth1.scores[1:]} == {"animals/a1", "animals/a2"}
    assert all(torch.equal(x.matches.cos_max, y.matches.cos_max)
               for x, y in zip(auth1.scores, auth2.scores))


# ------------------------------------------------------------------------------ real data

def test_dragbench_loader_reads_all_205_samples_and_349_pairs():
    require_shared(DRAGBENCH)
    from dragexp.data import DragBenchSamples

    data = DragBenchSamples(DRAGBENCH)
    assert len(data) == 205 and len(data.categories) == 10
    assert data.names == sorted(data.names)
    pairs, sizes = 0, set()
    for s in data:
        h, w = s.size
        assert s.image.dtype == np.uint8 and s.image.shape == (h, w, 3) and w == 512
        assert s.mask.shape == (h, w) and s.mask.dtype == np.uint8 and set(np.unique(s.mask)) <= {0, 1}
        assert len(s.points) % 2 == 0 and len(s.points) >= 2 and isinstance(s.prompt, str)
        pairs += len(s.points) // 2
        sizes.add((h, w))
    assert pairs == 349
    assert 288 <= min(h for h, _ in sizes) and max(h for h, _ in sizes) <= 913


def test_pil_resize_matches_the_stored_case_image():
    case = CONFORMANCE / "dragbench_eval_metrics"
    require_shared(case)
    from dragexp.evaluation.resize import load_rgb, resize_to_source

    src = load_rgb(case / "s0_original_image.png")
    out = resize_to_source(load_rgb(case / "s0_dragged_image.png"), src.shape[:2])
    assert np.array_equal(out, load_rgb(case / "s0_expected_dragged_resized.png"))


def test_public_dragbench_eval_cases_pass(capsys):
    cases = conformance_cases("dragbench_eval_")
    if not cases:
        pytest.skip(f"{CONFORMANCE} is absent: the shared data folder is not next to this checkout")
    from dragexp.conformance.__main__ import main

    rc = main([str(c) for c in cases])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("PASS dragbench_eval_") == len(cases), out


# ------------------------------------------------------------------------------ end to end

def _fake_run(run: Path, bench: Path, drop: str, fail: str) -> None:
    """A dragexp run folder: results/<name>/dragged_image.png (one failed, one absent)."""
    for name, _, _, _ in SPECS:
        if name in (drop, fail):
            continue
        img = np.asarray(Image.open(bench / name / "original_image.png"))
        d = run / "results" / name
        d.mkdir(parents=True)
        Image.fromarray(np.roll(img, 2, axis=1)).resize((64, 64)).save(d / "dragged_image.png")
    (run / "run_summary.json").write_text(json.dumps(dict(method="fake_drag")))
    (run / "errors.json").write_text(json.dumps([dict(name=fail, error="BorderError: too close")]))


def test_evaluate_script_end_to_end(tmp_path):
    bench, run, out = tmp_path / "bench", tmp_path / "run", tmp_path / "eval"
    _write_bench(bench, SPECS)
    _fake_run(run, bench, drop="", fail="animals/a2")
    plain = tmp_path / "plain"
    for name, *_ in SPECS:  # the community layout, no run folder around it
        (plain / name).mkdir(parents=True)
        Image.open(bench / name / "original_image.png").save(plain / name / "dragged_image.png")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "scripts/evaluate.py", f"results=[{run},{plain},do_nothing]",
           f"data.root={bench}", f"hydra.run.dir={out}", "eval.ensemble_size=2",
           "eval.attention_slicing=null", "progress=false"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    with (out / "comparison.csv").open() as fh:
        comp = list(csv.DictReader(fh))
    assert [r["method"] for r in comp] == ["fake_drag", "plain", "do_nothing"]
    assert [int(r["n_samples"]) for r in comp] == [2, 3, 3]
    assert comp[0]["n_missing"] == "1"
    # the protocol is named with each number, and a deviation from the published settings too
    assert comp[0]["protocol"] == "dragbench-dragdiffusion (modified: ensemble_size=2)"
    assert comp[0]["comparable_md"] == "False"
    # an unedited copy and "do nothing" score the same, IF = 1
    assert comp[1]["md"] == comp[2]["md"] and float(comp[2]["if_"]) == 1.0
    with (out / "missing.csv").open() as fh:
        assert "BorderError: too close" in fh.read()
    with (out / "categories.csv").open() as fh:
        cats = list(csv.DictReader(fh))
    assert {(r["method"], r["category"]) for r in cats} >= {("plain", "animals"), ("plain", "land_scape")}
    doc = json.loads((out / "evaluation.json").read_text())
    assert doc["protocols"]["fake_drag"]["name"].startswith("dragbench-dragdiffusion")
    assert len([s for s in doc["samples"] if s["method"] == "plain"]) == 3
    for f in ("samples.csv", "comparison.md", "md_if_scatter.png", "per_category.png"):
        assert (out / f).is_file(), f
    assert "Protocol: dragbench-dragdiffusion (modified" in (out / "comparison.md").read_text()
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run"


# ------------------------------------------------------------------------------ model sources

def test_lpips_pretrained_reads_torchvision_alexnet_file(tmp_path):
    from torchvision.models import alexnet

    from dragexp.evaluation.lpips_if import build_lpips
    from dragexp.models.errors import ModelSourceError

    torch.manual_seed(3)
    sd = alexnet(weights=None).state_dict()
    f = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(sd, f)
    net = build_lpips("pretrained", path=str(f))
    assert net.description == "LPIPS-alex v0.1"
    assert torch.equal(getattr(net.net.slice1, "0").weight, sd["features.0.weight"])
    assert torch.equal(getattr(net.net.slice5, "10").bias, sd["features.10.bias"])
    with pytest.raises(ModelSourceError, match="eval/lpips=random"):
        build_lpips("pretrained", path=str(tmp_path / "absent.pth"))


def test_clip_file_and_missing_weights(tmp_path):
    from dragexp.evaluation.clip_sim import build_clip, clip_similarity
    from dragexp.models.errors import ModelSourceError

    tiny = build_clip("tiny", seed=1)
    img = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert float(clip_similarity(tiny, img, img)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ModelSourceError, match="not found"):
        build_clip("file", str(tmp_path / "ViT-B-32.pt"))


def test_sweep_folder_expands_to_one_row_per_setting(tmp_path):
    from dragexp.evaluation.runner import resolve_results

    for k, idx in enumerate(([2], [3])):
        job = tmp_path / f"job{k}"
        (job / "results" / "animals" / "a1").mkdir(parents=True)
        (job / "run_summary.json").write_text(json.dumps(dict(
            method="dragdiffusion", overrides=[f"method.feature_idx={idx}", "data.n=1"])))
    folders = resolve_results([str(tmp_path)])
    assert [f.label for f in folders] == ["dragdiffusion method.feature_idx=[2]",
                                         "dragdiffusion method.feature_idx=[3]"]
    with pytest.raises(FileNotFoundError):
        resolve_results([str(tmp_path / "nothing")])


def test_partial_run_is_scored_on_the_samples_it_has(tmp_path):
    """A run over 1 of 3 benchmark samples: scored on that one, nothing reported missing."""
    from dragexp.evaluation.runner import resolve_results

    bench, run = tmp_path / "bench", tmp_path / "run"
    _write_bench(bench, SPECS)
    first = SPECS[0][0]
    _fake_run(run, bench, drop="", fail="")
    for name, *_ in SPECS[1:]:   # keep only the first sample's result, as a 1-sample run would
        import shutil

        shutil.rmtree(run / "results" / name)
    (run / "errors.json").write_text("[]")
    from omegaconf import OmegaConf

    from dragexp.evaluation.runner import build_data

    samples = build_data(OmegaConf.create({"_target_": "dragexp.data.DragBenchSamples",
                                           "root": str(bench)}))
    folder, = resolve_results([str(run)])
    assert folder.attempted(list(samples.names)) == [first]
