"""scripts/bench_reference.py without the authors' code: its options and its clear error when
the reference checkout or pinned env is missing (the side by side itself needs both; see
dragexp/performance/reference_bench.py for the setup)."""

import pytest

from dragexp.performance import reference_bench as rb


def test_defaults_and_options():
    args = rb.parse_args([])
    assert args.methods == ["dragdiffusion", "dragnoise"]
    assert (args.model, args.size, args.n_pix_step, args.lora_steps, args.repeat) == \
        ("tiny", None, None, 0, 1)
    assert args.settings_list[:2] == ["faithful", "fast"]
    args = rb.parse_args(["--method", "dragnoise", "--model", "sd15_random", "--size", "256",
                          "--n-pix-step", "5", "--settings", "faithful", "--repeat", "2",
                          "--reference-dir", "/nowhere", "--json", "/tmp/x.json"])
    assert (args.methods, args.model, args.size, args.n_pix_step, args.settings_list,
            args.repeat, args.reference_dir, args.json) == (
        ["dragnoise"], "sd15_random", 256, 5, ["faithful"], 2, "/nowhere", "/tmp/x.json")


@pytest.mark.parametrize("argv", [["--method", "easydrag"], ["--size", "100"],
                                  ["--model", "toy"], ["--repeat", "0"],
                                  ["--lora-steps", "5"]])
def test_bad_options_exit(argv):
    with pytest.raises(SystemExit):
        rb.parse_args(argv)


def test_missing_reference_names_the_path(tmp_path):
    with pytest.raises(SystemExit) as exc:
        rb.main(["--method", "dragnoise", "--reference-dir", str(tmp_path)])
    msg = str(exc.value)
    assert str(tmp_path / "DragNoise" / "drag_pipeline.py") in msg
    assert str(tmp_path / "env-dn" / "diffusers") in msg
    assert "haofengl/DragNoise" in msg and "10727312aef7" in msg and "0.17.1" in msg


def test_present_reference_passes_the_check(tmp_path):
    for f in ("DragDiffusion/drag_pipeline.py", "DragDiffusion/utils/drag_utils.py"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    (tmp_path / "env-dd" / "diffusers").mkdir(parents=True)
    checkout, env = rb.check_reference("dragdiffusion", tmp_path)
    assert (checkout, env) == (tmp_path / "DragDiffusion", tmp_path / "env-dd")


def test_differences_report_max_and_shape_mismatch():
    import torch

    ref = dict(final_latent=torch.zeros(1, 4, 2, 2), optimised=torch.zeros(1, 4, 2, 2),
               image=torch.full((1, 3, 2, 2), 0.5))
    ours = dict(final_latent=torch.full((1, 4, 2, 2), 0.25), optimised=torch.zeros(1, 4, 3, 3),
                image=torch.full((2, 2, 3), 0.5))
    d = rb.differences(ref, ours)
    assert d["final_latent"]["max_abs"] == 0.25
    assert d["image"]["max_abs"] == 0.0
    assert "shapes differ" in d["optimised"]
