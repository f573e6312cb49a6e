"""Loading real Stable Diffusion 1.5-family weights, and saving a bundle as a diffusers folder.

Three sources are supported: a Hugging Face Hub id (downloaded or already in the local cache), a
local diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``), and a community
single-file checkpoint (``.safetensors`` / ``.ckpt`` in the original LDM layout). Every failure to
find or read a source becomes a one-line :class:`ModelSourceError` that says what to do.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from dragexp.models.bundle import ModelBundle
from dragexp.models.errors import ModelSourceError

from ..core.schedule import SD_SCHEDULER_CONFIG

DEFAULT_SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""The SD 1.5 weights on the Hub (``runwayml/stable-diffusion-v1-5`` was removed; this is its mirror)."""

# Only configs and tokenizer files: what from_single_file needs besides the checkpoint itself.
_CONFIG_PATTERNS = ["*.json", "**/*.json", "*.txt", "**/*.txt"]

# Hub failures surface as OSError (offline, missing file, HTTP errors, connection errors all
# derive from it) or ValueError (malformed repo ids); both mean "this source cannot be loaded".
_LOAD_ERRORS = (OSError, ValueError)


def _offline_from_env() -> bool:
    """Whether HF_HUB_OFFLINE says not to contact the Hub, now or when huggingface_hub loaded.

    huggingface_hub reads the variable once at import; reading it again here lets a caller (or a
    test) switch offline mode on for one load.
    """
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


_REACHABLE: dict[tuple[str, int], bool] = {}
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's endpoint accepts a TCP connection within ``timeout`` seconds (asked once
    per process).

    Without network, huggingface_hub retries each file for about a minute before giving up; this
    check lets a missing id fail in seconds instead. Behind a proxy a direct connection proves
    nothing, so there the Hub counts as reachable.
    """
    if any(os.environ.get(k) for k in _PROXY_VARS):
        return True
    url = urlparse(huggingface_hub.constants.ENDPOINT)
    key = (url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443))
    if key not in _REACHABLE:
        try:
            socket.create_connection(key, timeout=timeout).close()
            _REACHABLE[key] = True
        except OSError:
            _REACHABLE[key] = False
    return _REACHABLE[key]


def offline_reason() -> str | None:
    """Why the Hub is not to be contacted (HF_HUB_OFFLINE, or no connection), or None."""
    if _offline_from_env():
        return "HF_HUB_OFFLINE is set"
    if not _hub_reachable():
        return (f"{urlparse(huggingface_hub.constants.ENDPOINT).hostname} cannot be reached "
                "from this machine")
    return None


@contextlib.contextmanager
def _quiet_hub_deprecations():
    """Silences huggingface_hub's deprecation notice for an argument diffusers still passes
    (``local_dir_use_symlinks``): it says nothing about the user's model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        yield


def _looks_like_path(source: str) -> bool:
    """True for strings that can only be filesystem paths (a Hub id is exactly ``owner/name``)."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def _first_line(err: Exception) -> str:
    """The exception's type and the first line of its message, for one-line errors."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _hub_error(
    source: str, err: Exception, what: str = "model", alternative: str | None = None
) -> ModelSourceError:
    """The one-line error for a Hub id that could not be loaded, with the two ways out."""
    alternative = alternative or "use a local diffusers folder (model=local model.path=/path/to/folder)"
    offline = offline_reason()
    where = (f"its local cache (offline: {offline})" if offline else
             f"the Hugging Face Hub or its local cache ({type(err).__name__})")
    return ModelSourceError(
        f"could not load {what} '{source}' from {where}; download it with `hf download {source}` "
        f"on a machine with network and set HF_HOME to that cache, or {alternative}"
    )


def _resolution(unet: UNet2DConditionModel, vae: AutoencoderKL, resolution: int | None) -> int:
    """The given resolution, or the one the UNet was configured for (512 for SD 1.5)."""
    if resolution is not None:
        return int(resolution)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(unet.config.sample_size) * vae_scale


def _own_memory(bundle: ModelBundle) -> ModelBundle:
    """Copies every CPU parameter and buffer out of the memory-mapped weight files.

    Loaded tensors point into the mapped file at arbitrary byte offsets; CPU kernels pick their
    vectorised paths by alignment, so such a model's outputs differ in the last bits from the
    same weights in freshly allocated (64-byte aligned) memory. Copying makes a loaded model
    bitwise reproducible and releases the file.
    """
    with torch.no_grad():
        for module in bundle._modules():
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    return bundle


def _load_vae(source: str, revision: str | None, local_files_only: bool | None) -> AutoencoderKL:
    """An AutoencoderKL from a Hub id or a local folder (an AutoencoderKL folder or a pipeline)."""
    path = Path(source).expanduser()
    if path.is_dir():
        # A whole pipeline folder is accepted too: its VAE lives in vae/.
        is_pipeline = not (path / "config.json").exists() and (path / "vae").is_dir()
        try:
            return AutoencoderKL.from_pretrained(
                str(path), subfolder="vae" if is_pipeline else None, torch_dtype=torch.float32
            )
        except _LOAD_ERRORS as err:
            raise ModelSourceError(
                f"could not load a VAE from local folder {path}: {_first_line(err)}"
            ) from err
    if _looks_like_path(source):
        raise ModelSourceError(f"VAE folder not found: {source}")
    if local_files_only is None:
        local_files_only = offline_reason() is not None
    try:
        with _quiet_hub_deprecations():
            return AutoencoderKL.from_pretrained(
                source, revision=revision, local_files_only=local_files_only,
                torch_dtype=torch.float32)
    except _LOAD_ERRORS as err:
        raise _hub_error(source, err, "VAE") from err


def load_pretrained(path_or_id: str = DEFAULT_SD15_ID, vae: str | None = None,
                    revision: str | None = None, variant: str | None = None,
                    local_files_only: bool | None = None,
                    resolution: int | None = None) -> ModelBundle:
    """Loads an SD 1.5-family model in diffusers layout from the Hub or a local folder.

    Args:
        path_or_id: a Hub id (default ``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local
            diffusers folder with ``unet/``, ``vae/``, ``text_encoder/`` and ``tokenizer/``.
        vae: optional VAE replacing the model's own: a Hub id (e.g. ``stabilityai/sd-vae-ft-mse``)
            or a local folder.
        revision: Hub revision (branch, tag or commit).
        variant: weight file variant, e.g. ``"fp16"`` for ``*.fp16.safetensors``.
        local_files_only: never contact the Hub; None means "if HF_HUB_OFFLINE is set or the
            Hub cannot be reached" (:func:`offline_reason`).
        resolution: working image side; None reads it from the UNet config (512 for SD 1.5).

    Returns:
        A float32, eval-mode, frozen bundle on the CPU (move it with :meth:`ModelBundle.to`).

    Raises:
        ModelSourceError: the folder or id could not be loaded (one line saying what to do).
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        root, source, hub_kwargs = str(path), f"local:{path}", {}
    elif _looks_like_path(path_or_id):
        raise ModelSourceError(f"local model folder not found: {path_or_id}")
    else:
        if local_files_only is None:
            local_files_only = offline_reason() is not None
        root, source = path_or_id, f"hub:{path_or_id}"
        hub_kwargs = dict(revision=revision, local_files_only=local_files_only)

    try:
        with _quiet_hub_deprecations():
            # float32 explicitly: transformers 5 otherwise keeps the checkpoint's dtype ("auto").
            unet = UNet2DConditionModel.from_pretrained(
                root, subfolder="unet", variant=variant, torch_dtype=torch.float32, **hub_kwargs
            )
            own_vae = None if vae else AutoencoderKL.from_pretrained(
                root, subfolder="vae", variant=variant, torch_dtype=torch.float32, **hub_kwargs
            )
            text_encoder = CLIPTextModel.from_pretrained(
                root, subfolder="text_encoder", variant=variant, dtype=torch.float32, **hub_kwargs
            )
            tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **hub_kwargs)
    except _LOAD_ERRORS as err:
        if path.is_dir():
            raise ModelSourceError(
                f"could not load the diffusers folder {path} (needs unet/, vae/, text_encoder/, "
                f"tokenizer/): {_first_line(err)}"
            ) from err
        raise _hub_error(path_or_id, err) from err

    if vae:
        own_vae = _load_vae(vae, revision=None, local_files_only=local_files_only)
        source += f"+vae:{vae}"
    bundle = ModelBundle(
        unet, own_vae, text_encoder, tokenizer, _resolution(unet, own_vae, resolution), source
    )
    return _own_memory(bundle.to("cpu"))


def _config_folder(config: str, local_files_only: bool | None) -> str:
    """A local folder holding the diffusers configs for a single-file checkpoint.

    A Hub id is resolved here, configs only, so that offline it fails at once with our message
    (diffusers itself retries online when the cache lacks them).
    """
    path = Path(config).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_like_path(config):
        raise ModelSourceError(f"config folder for the single-file checkpoint not found: {config}")
    if local_files_only is None:
        local_files_only = offline_reason() is not None
    try:
        return huggingface_hub.snapshot_download(
            config, allow_patterns=_CONFIG_PATTERNS, local_files_only=local_files_only
        )
    except _LOAD_ERRORS as err:
        raise _hub_error(
            config, err, "configs", "pass config=/path/to/a/diffusers/folder of the same architecture"
        ) from err


def load_single_file(
    path: str,
    config: str | None = None,
    vae: str | None = None,
    resolution: int | None = None,
    local_files_only: bool | None = None,
) -> ModelBundle:
    """Loads a community single-file SD 1.5 checkpoint (``.safetensors`` / ``.ckpt``, LDM layout).

    Args:
        path: the checkpoint file (UNet, VAE and CLIP text encoder in the original CompVis keys).
        config: the architecture as a local diffusers folder or a Hub id; only its configs and
            tokenizer files are read. None means ``stable-diffusion-v1-5/stable-diffusion-v1-5``
            (must be in the Hub cache when offline).
        vae: optional VAE replacing the checkpoint's: a Hub id or a local folder.
        resolution: working image side; None reads it from the UNet config (512 for SD 1.5).
        local_files_only: never contact the Hub; None means "if HF_HUB_OFFLINE is set or the
            Hub cannot be reached" (:func:`offline_reason`).

    Returns:
        A float32, eval-mode, frozen bundle on the CPU.

    Raises:
        ModelSourceError: the file, the config or the VAE could not be loaded.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelSourceError(f"single-file checkpoint not found: {path}")
    config_folder = _config_folder(config or DEFAULT_SD15_ID, local_files_only)
    overrides = {"vae": _load_vae(vae, None, local_files_only)} if vae else {}
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(file),
            config=config_folder,
            local_files_only=True,
            torch_dtype=torch.float32,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **overrides,
        )
    except (*_LOAD_ERRORS, KeyError, RuntimeError) as err:
        # KeyError / RuntimeError: keys or shapes that do not match the config's architecture.
        raise ModelSourceError(
            f"could not load single-file checkpoint {path} with the architecture of "
            f"{config or DEFAULT_SD15_ID}: {_first_line(err)}"
        ) from err
    source = f"single_file:{file}" + (f"+vae:{vae}" if vae else "")
    bundle = ModelBundle(
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
        pipe.tokenizer,
        resolution=_resolution(pipe.unet, pipe.vae, resolution),
        source=source,
    )
    return _own_memory(bundle.to("cpu"))


def save_bundle(bundle: ModelBundle, folder: str | os.PathLike) -> Path:
    """Writes a bundle as a diffusers ``StableDiffusionPipeline`` folder.

    The folder has ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (SD 1.5's
    DDIM configuration) and ``model_index.json``, so both :func:`load_pretrained` and
    ``StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)`` load it.

    Args:
        bundle: the models to save.
        folder: target folder (created if missing).

    Returns:
        The folder's path.
    """
    pipe = StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def load_local(path: str, vae: str | None = None, resolution: int | None = None) -> ModelBundle:
    """A local diffusers folder (``model=local model.path=/my/sd15``); never contacts the Hub."""
    if not Path(path).is_dir():
        raise ModelSourceError(f"model.path={path!r} is not a folder: give a local diffusers "
                               "folder (unet/, vae/, text_encoder/, tokenizer/)")
    return load_pretrained(path, vae=vae, local_files_only=True, resolution=resolution)
