"""Every method config builds an object of the one method contract (dragexp.methods.base)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dragexp.methods.base import DragMethod, EditContext, image_tensor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))


@pytest.mark.parametrize("name", METHODS)
def test_every_method_config_implements_the_contract(name):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"method={name}"])
    method = instantiate(cfg.method)
    assert isinstance(method, DragMethod), name
    steps = method.edit_steps()
    assert isinstance(steps, int) and 0 < steps <= 1000


CALLBACKS = sorted(p.stem for p in (CONFIGS / "callbacks").glob("*.yaml"))


@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_its_own_drag_callbacks(name):
    """configs/callbacks/<method>.yaml is chosen by the method's name, and builds."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"method={name}"],
                      return_hydra_config=True)
    assert cfg.hydra.runtime.choices.callbacks == name
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    latent_loop = "Latent" in cfg.method._target_ or "EasyDrag" in cfg.method._target_
    assert bool(callbacks) == latent_loop, name


@pytest.mark.parametrize("callbacks", CALLBACKS)
def test_callbacks_configs_own_their_numbers(callbacks):
    """A callbacks set reads nothing from method.*: it builds beside a method without a loop."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["method=dragondiffusion", f"callbacks={callbacks}"])
    for c in cfg.callbacks.values():
        instantiate(c)


def test_dragnoise_tracks_with_the_reference_border_and_dragdiffusion_clips():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        dn = instantiate(compose("train", overrides=["method=dragnoise"]).callbacks.tracking)
        dd = instantiate(compose("train").callbacks.tracking)
    assert (dn.tracker.border, dd.tracker.border) == ("reference", "clip")
    assert dn.tracker.radius == dd.tracker.radius == 3


def test_edit_context_defaults_and_freezing():
    ctx = EditContext(callbacks=[1, 2])
    assert ctx.callbacks == (1, 2) and ctx.lora_callbacks == () and ctx.speed is not None
    assert ctx.precision == "32-true" and ctx.lora_dir is None
    with pytest.raises(AttributeError):
        ctx.precision = "bf16-mixed"


def test_image_tensor_ranges():
    img = np.array([[[0, 255, 127]]], dtype=np.uint8)
    plain, centred = image_tensor(img), image_tensor(img, centred=True)
    assert plain.shape == (1, 3, 1, 1)
    assert plain.flatten().tolist() == pytest.approx([-1.0, 1.0, 127 / 127.5 - 1])
    assert centred.flatten().tolist() == pytest.approx(plain.flatten().tolist(), abs=1e-6)
