"""Tests for dragexp.reporting.drawing."""

from __future__ import annotations

import numpy as np
import pytest

from dragexp.reporting.drawing import draw_drag, side_by_side


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(60, 200, (h, w, 3), dtype=np.uint8)


def _redish(px):
    r, g, b = (int(v) for v in px)
    return r > 150 and g < 100 and b < 100


def _blueish(px):
    r, g, b = (int(v) for v in px)
    return b > 150 and r < 100 and g < 120


@pytest.mark.parametrize("h,w", [(128, 128), (512, 512), (129, 131)])
def test_points_drawn_and_rest_untouched(h, w):
    img = _image(h, w)
    before = img.copy()
    hx, hy = w // 4, h // 4
    tx, ty = w // 2, h // 4
    out = draw_drag(img, [(hx, hy)], [(tx, ty)])
    np.testing.assert_array_equal(img, before)  # input not modified
    assert out.shape == img.shape and out.dtype == np.uint8
    assert _redish(out[hy, hx])
    assert _blueish(out[ty, tx])
    # the arrow shaft between them is drawn
    assert not np.array_equal(out[hy, (hx + tx) // 2], img[hy, (hx + tx) // 2])
    # far from every mark (bottom-right quarter) nothing changes
    np.testing.assert_array_equal(out[h // 2 + 10:, w // 2 + 10:], img[h // 2 + 10:, w // 2 + 10:])


def test_trajectories_and_mask():
    img = _image(128, 160)
    mask = np.zeros((128, 160), np.uint8)
    mask[80:120, 100:150] = 1
    traj = [[(20, 20), (25, 30), (30, 40), (35, 50)]]
    out = draw_drag(img, [(20, 20)], [(60, 20)], trajectories=traj, mask=mask)
    assert out.shape == img.shape
    # the mask region is tinted; the yellow trajectory shows mid-way along its path
    assert not np.array_equal(out[100, 125], img[100, 125])
    r, g, b = (int(v) for v in out[40, 30])
    assert r > 200 and g > 180 and b < 80
    # an all-zero mask draws nothing
    out0 = draw_drag(img, [(20, 20)], [(60, 20)], mask=np.zeros((128, 160), np.uint8))
    np.testing.assert_array_equal(out0[70:, 80:], img[70:, 80:])


def test_multiple_pairs_and_errors():
    img = _image(128, 128)
    out = draw_drag(img, [(20, 100), (100, 100)], [(20, 60), (100, 60)])
    assert _redish(out[100, 20]) and _redish(out[100, 100])
    with pytest.raises(ValueError):
        draw_drag(img, [(1, 1)], [])
    with pytest.raises(ValueError):
        draw_drag(img, [(1, 1)], [(2, 2)], mask=np.zeros((10, 10), np.uint8))


def test_side_by_side_pads_heights():
    a = _image(40, 30, 1)
    b = _image(64, 50, 2)
    out = side_by_side([a, b], gap=4)
    assert out.shape == (64, 30 + 4 + 50, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:40, :30], a)
    np.testing.assert_array_equal(out[:, 34:], b)
    assert (out[40:, :30] == 255).all()
    labelled = side_by_side([a, b], labels=["source", "edit"])
    assert labelled.shape[0] > 64 and labelled.shape[1] == out.shape[1]
    with pytest.raises(ValueError):
        side_by_side([a, b], labels=["only one"])


def test_written_folders_follow_the_umask(tmp_path):
    """Result and saved-sample folders are written under a temporary name (mkdtemp: 0700) and
    renamed; the finished folders get the user's umask, like every other file of a run."""
    import os
    import stat

    from dragexp.app.editor import write_dragbench_sample
    from dragexp.reporting.results import staging_dir

    old = os.umask(0o022)
    try:
        image = np.zeros((16, 16, 3), np.uint8)
        saved = write_dragbench_sample(tmp_path / "bench", "art", "s1", image, [(2, 2), (8, 8)],
                                       None, "a prompt")
        (tmp_path / "results").mkdir()
        staged = staging_dir(tmp_path / "results" / "s2")
    finally:
        os.umask(old)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o755
    assert stat.S_IMODE(staged.stat().st_mode) == 0o755
