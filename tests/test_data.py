"""Tests for dragexp.data: DragSample validation and the three sample sources."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dragexp.data import (
    DragBenchSamples,
    DragSample,
    FolderSamples,
    ProceduralSamples,
    SampleError,
    validate_sample,
    write_sample_folder,
)
from dragexp.data.dragbench import load_meta_data

DRAGBENCH = Path(__file__).resolve().parents[2] / "shared" / "dragbench"


def _sample(name="cat_01", h=40, w=60, points=((10, 12), (30, 12)), mask=None, **kw):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return DragSample(name=name, image=image, points=[tuple(p) for p in points], mask=mask, **kw)


# --------------------------------------------------------------------------- validate_sample


def test_validate_normalises_and_copies():
    s = _sample(points=np.array([[1, 2], [3.5, 4.25]]), mask=None, prompt=None)
    v = validate_sample(s)
    assert v is not s
    assert v.image.dtype == np.uint8 and v.image.shape == (40, 60, 3)
    assert v.points == [(1.0, 2.0), (3.5, 4.25)]
    assert v.handles == [(1.0, 2.0)] and v.targets == [(3.5, 4.25)]
    assert v.size == (40, 60)
    assert v.mask.dtype == np.uint8 and v.mask.shape == (40, 60) and not v.mask.any()
    assert not v.has_mask
    assert v.prompt == ""
    v.image[0, 0] = 0
    assert s.image is not v.image


@pytest.mark.parametrize("points", [[(1, 1), (2, 2), (3, 3)], [(1, 1)]])
def test_odd_points(points):
    with pytest.raises(SampleError) as e:
        validate_sample(_sample(points=points))
    msg = str(e.value)
    assert "cat_01" in msg and "points" in msg and f"{len(points)} given" in msg and "even" in msg


def test_zero_points():
    with pytest.raises(SampleError, match=r"cat_01.*points: 0 given"):
        validate_sample(_sample(points=[]))


@pytest.mark.parametrize("bad", [(60, 5), (-1, 5), (5, 40), (5, -0.5), (59.5, 5)])
def test_point_outside_image(bad):
    with pytest.raises(SampleError) as e:
        validate_sample(_sample(points=[(1, 1), (2, 2), (3, 3), bad]))
    msg = str(e.value)
    assert "cat_01" in msg and "points" in msg
    assert "point 3" in msg and "H=40" in msg and "W=60" in msg
    assert f"{bad[0]:g}" in msg and f"{bad[1]:g}" in msg


def test_float_points_on_the_border_are_valid():
    v = validate_sample(_sample(points=[(0, 0), (59.0, 39.0), (58.75, 0.5), (0.0, 38.9)]))
    assert v.points[1] == (59.0, 39.0)


def test_wrong_mask_size():
    with pytest.raises(SampleError) as e:
        validate_sample(_sample(mask=np.ones((40, 61), np.uint8)))
    msg = str(e.value)
    assert "cat_01" in msg and "mask" in msg and "W=61" in msg and "W=60" in msg


def test_mask_0_255_equals_0_1():
    m01 = np.zeros((40, 60), np.uint8)
    m01[5:20, 10:30] = 1
    a = validate_sample(_sample(mask=m01))
    b = validate_sample(_sample(mask=m01 * 255))
    c = validate_sample(_sample(mask=m01.astype(bool)))
    d = validate_sample(_sample(mask=m01.astype(np.float32) * 0.5))
    for v in (a, b, c, d):
        assert v.mask.dtype == np.uint8
        np.testing.assert_array_equal(v.mask, m01)
    assert a.has_mask


@pytest.mark.parametrize("h,w", [(129, 131), (341, 512), (17, 9)])
def test_non_multiple_of_8_sizes_accepted(h, w):
    v = validate_sample(_sample(h=h, w=w, points=[(0, 0), (w - 1, h - 1)]))
    assert v.size == (h, w)


def test_gray_and_rgba_converted():
    s = _sample()
    gray = validate_sample(DragSample("g", s.image[:, :, 0], s.points, None))
    assert gray.image.shape == (40, 60, 3)
    np.testing.assert_array_equal(gray.image[:, :, 2], s.image[:, :, 0])
    rgba = np.concatenate([s.image, np.full((40, 60, 1), 7, np.uint8)], axis=2)
    v = validate_sample(DragSample("r", rgba, s.points, None))
    np.testing.assert_array_equal(v.image, s.image)


def test_bad_image_dtype_and_shape():
    s = _sample()
    with pytest.raises(SampleError, match=r"'f'.*image.*float32"):
        validate_sample(DragSample("f", s.image.astype(np.float32), s.points, None))
    with pytest.raises(SampleError, match=r"'c'.*image.*shape"):
        validate_sample(DragSample("c", s.image[:, :, :2], s.points, None))


def test_bad_names():
    for bad in ["", "../x", "a//b", "a\\b"]:
        with pytest.raises(SampleError, match="name"):
            validate_sample(_sample(name=bad))
    assert validate_sample(_sample(name="animals/JH_2023-09-14-1820-16")).name.startswith("animals/")


# --------------------------------------------------------------------------- procedural


def test_procedural_deterministic_and_valid():
    a = ProceduralSamples(n=6, size=(128, 128), seed=3)
    b = ProceduralSamples(n=6, size=(128, 128), seed=3)
    c = ProceduralSamples(n=6, size=(128, 128), seed=4)
    assert len(a) == 6
    names = [s.name for s in a]
    assert len(set(names)) == 6 and names[0] == "disc_stretch_right"
    for sa, sb, sc in zip(a, b, c):
        np.testing.assert_array_equal(sa.image, sb.image)
        np.testing.assert_array_equal(sa.mask, sb.mask)
        assert sa.points == sb.points and sa.prompt == sb.prompt
        assert not np.array_equal(sa.image, sc.image)
        assert validate_sample(sa).points == sa.points
        assert sa.image.dtype == np.uint8 and sa.image.shape == (128, 128, 3)
        assert len(sa.points) % 2 == 0 and len(sa.points) >= 2
        assert sa.prompt and "background" in sa.prompt
        for (hx, hy), (tx, ty) in zip(sa.handles, sa.targets):
            assert (hx, hy) != (tx, ty)
        if sa.has_mask:  # the mask covers every handle and target
            for x, y in sa.points:
                assert sa.mask[int(y), int(x)] == 1
    assert any(s.has_mask for s in a) and any(not s.has_mask for s in a)
    assert a[-1].name == a[5].name
    assert [s.name for s in a[1:3]] == names[1:3]
    with pytest.raises(IndexError):
        a[6]


@pytest.mark.parametrize("size", [(129, 131), (96, 200), (300, 72), (16, 16)])
def test_procedural_sizes(size):
    for s in ProceduralSamples(n=5, size=size, seed=0):
        assert s.size == size
        h, w = size
        for x, y in s.points:
            assert 0 <= x <= w - 1 and 0 <= y <= h - 1


def test_procedural_bad_args():
    with pytest.raises(ValueError, match="n"):
        ProceduralSamples(n=-1)
    with pytest.raises(ValueError, match="size"):
        ProceduralSamples(size=(8, 8))


# --------------------------------------------------------------------------- folder


def test_folder_round_trip(tmp_path):
    samples = list(ProceduralSamples(n=5, size=(72, 90), seed=1))
    samples[0].extras["shift"] = [3, -2]
    for s in samples:
        write_sample_folder(s, tmp_path / s.name)
    fs = FolderSamples(tmp_path)
    assert fs.names == sorted(s.name for s in samples)
    by_name = {s.name: s for s in samples}
    for got in fs:
        want = by_name[got.name]
        np.testing.assert_array_equal(got.image, want.image)
        np.testing.assert_array_equal(got.mask, want.mask)
        assert got.points == want.points and got.prompt == want.prompt
        assert got.category == want.category
    assert fs[fs.names.index(samples[0].name)].extras == {"shift": [3, -2]}
    assert len(FolderSamples(tmp_path, limit=2)) == 2
    picked = FolderSamples(tmp_path, names=[samples[3].name, samples[1].name])
    assert [s.name for s in picked] == [samples[3].name, samples[1].name]
    with pytest.raises(SampleError, match="nope"):
        FolderSamples(tmp_path, names=["nope"])


def test_folder_json_other_image_name_and_mask_key(tmp_path):
    d = tmp_path / "my edit"
    d.mkdir()
    img = np.full((33, 47, 3), 90, np.uint8)
    Image.fromarray(img).save(d / "photo.jpg", quality=95)
    m = np.zeros((33, 47), np.uint8)
    m[3:9, 4:20] = 255
    Image.fromarray(m, "L").save(d / "region.png")
    (d / "drag.json").write_text(json.dumps({"points": [[4, 5], [20, 6.5]], "prompt": "p",
                                             "mask": "region.png"}))
    s = FolderSamples(tmp_path)[0]
    assert s.name == "my edit" and s.size == (33, 47) and s.prompt == "p"
    assert s.points == [(4.0, 5.0), (20.0, 6.5)]
    np.testing.assert_array_equal(s.mask, (m > 0).astype(np.uint8))


def test_folder_missing_root(tmp_path):
    root = tmp_path / "does_not_exist"
    with pytest.raises(SampleError, match="does_not_exist"):
        FolderSamples(root)


def test_folder_errors_are_lazy_and_name_the_file(tmp_path):
    good = ProceduralSamples(n=1, size=(40, 48))[0]
    write_sample_folder(good, tmp_path / "a_good")
    write_sample_folder(good, tmp_path / "b_no_image")
    (tmp_path / "b_no_image" / "image.png").unlink()
    write_sample_folder(good, tmp_path / "c_no_points")
    (tmp_path / "c_no_points" / "drag.yaml").unlink()
    write_sample_folder(good, tmp_path / "d_bad_yaml")
    (tmp_path / "d_bad_yaml" / "drag.yaml").write_text("points: [[1, 2], [3\nprompt: {")
    write_sample_folder(good, tmp_path / "e_odd")
    (tmp_path / "e_odd" / "drag.yaml").write_text("points: [[1, 2], [3, 4], [5, 6]]\n")
    write_sample_folder(good, tmp_path / "f_bad_json")
    (tmp_path / "f_bad_json" / "drag.yaml").unlink()
    (tmp_path / "f_bad_json" / "drag.json").write_text("{points: oops")

    fs = FolderSamples(tmp_path)  # building the source reads nothing
    assert len(fs) == 6
    assert fs[0].name == "a_good"
    with pytest.raises(SampleError) as e:
        fs[1]
    assert "b_no_image" in str(e.value) and str(tmp_path / "b_no_image" / "image.png") in str(e.value)
    with pytest.raises(SampleError) as e:
        fs[2]
    assert "c_no_points" in str(e.value) and str(tmp_path / "c_no_points" / "drag.yaml") in str(e.value)
    with pytest.raises(SampleError) as e:
        fs[3]
    assert "malformed" in str(e.value) and str(tmp_path / "d_bad_yaml" / "drag.yaml") in str(e.value)
    with pytest.raises(SampleError, match=r"e_odd.*points: 3 given"):
        fs[4]
    with pytest.raises(SampleError) as e:
        fs[5]
    assert str(tmp_path / "f_bad_json" / "drag.json") in str(e.value)

    results = list(fs.iter_checked())
    assert [n for n, _, _ in results] == fs.names
    assert [s is not None for _, s, _ in results] == [True, False, False, False, False, False]
    assert all(isinstance(err, SampleError) for _, s, err in results if s is None)


# --------------------------------------------------------------------------- DragBench


def _need_dragbench():
    if not DRAGBENCH.is_dir():
        pytest.skip(f"DragBench data not found at {DRAGBENCH} (shared/dragbench beside the repo)")


def test_dragbench_real_data_first_samples():
    _need_dragbench()
    cats = sorted(p.name for p in DRAGBENCH.iterdir() if p.is_dir())[:2]
    ds = DragBenchSamples(DRAGBENCH, categories=cats, per_category=3)
    expected = [f"{c}/{s}" for c in cats
                for s in sorted(p.name for p in (DRAGBENCH / c).iterdir() if p.is_dir())[:3]]
    assert ds.names == expected and len(ds) == 6
    for s in ds:
        assert s.category == s.name.split("/")[0]
        assert s.image.dtype == np.uint8 and s.image.ndim == 3 and s.image.shape[2] == 3
        assert s.image.shape[1] == 512
        assert s.mask.dtype == np.uint8 and s.mask.shape == s.image.shape[:2]
        assert set(np.unique(s.mask)) <= {0, 1} and s.has_mask
        assert isinstance(s.prompt, str)
        assert len(s.points) >= 2 and len(s.points) % 2 == 0
        assert all(isinstance(c, float) for p in s.points for c in p)
    assert len(DragBenchSamples(DRAGBENCH, categories=cats, limit=3)) == 3
    with pytest.raises(SampleError, match="no_such_category"):
        DragBenchSamples(DRAGBENCH, categories=["no_such_category"])


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_dragbench_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    sample = tmp_path / "root" / "animals" / "evil"
    sample.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(sample / "original_image.png")
    meta = {"prompt": "x", "points": [[1, 1], [2, 2]], "mask": _Evil(f"touch {marker}")}
    (sample / "meta_data.pkl").write_bytes(pickle.dumps(meta, protocol=4))

    ds = DragBenchSamples(tmp_path / "root")
    assert ds.names == ["animals/evil"]
    with pytest.raises(SampleError) as e:
        ds[0]
    msg = str(e.value)
    assert str(sample / "meta_data.pkl") in msg and "system" in msg and "animals/evil" in msg
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_unpickler_reads_numpy_payloads(tmp_path, protocol):
    mask = (np.arange(30).reshape(5, 6) % 3 == 0).astype(np.uint8)
    obj = {"prompt": "p", "points": [[1, 2], [3, 4]], "mask": mask, "s": np.float32(1.5)}
    p = tmp_path / "meta_data.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    got = load_meta_data(p)
    np.testing.assert_array_equal(got["mask"], mask)
    assert got["points"] == [[1, 2], [3, 4]] and got["s"] == np.float32(1.5)


def test_dragbench_missing_files(tmp_path):
    with pytest.raises(SampleError, match="nowhere"):
        DragBenchSamples(tmp_path / "nowhere")
    (tmp_path / "c" / "s").mkdir(parents=True)
    ds = DragBenchSamples(tmp_path)
    with pytest.raises(SampleError) as e:
        ds[0]
    assert str(tmp_path / "c" / "s" / "original_image.png") in str(e.value)
