"""Stable Diffusion 1.5-family models: loading, building random test models, and saving.

A :class:`ModelBundle` holds the UNet, VAE, text encoder and tokenizer. Sources:

* :func:`load_toy`: the toy model trained on the procedural world (committed, no download);
* :func:`build_tiny` / :func:`build_sd15_random`: random weights from configs, no download;
* :func:`load_pretrained`: a Hub id or a local diffusers folder;
* :func:`load_single_file`: a community ``.safetensors`` / ``.ckpt`` checkpoint.

:func:`save_bundle` and :func:`save_single_file` write the two on-disk formats the loaders read.
"""

from dragexp.models.bundle import ModelBundle
from dragexp.models.errors import ModelSourceError
from dragexp.models.pretrained import (DEFAULT_SD15_ID, load_local, load_pretrained,
                                        load_single_file, save_bundle)
from dragexp.models.single_file import save_single_file
from dragexp.models.tiny import build_sd15_random, build_tiny
from dragexp.models.toy import load_toy

__all__ = [
    "DEFAULT_SD15_ID",
    "ModelBundle",
    "ModelSourceError",
    "build_sd15_random",
    "build_tiny",
    "load_local",
    "load_pretrained",
    "load_single_file",
    "load_toy",
    "save_bundle",
    "save_single_file",
]
