"""LPIPS and Image Fidelity (docs/evaluation.md section 3).

``IF = 1 - mean LPIPS`` over samples. LPIPS is the lpips package's v0.1 AlexNet metric on the
source and the *resized* edited image, each scaled to [-1, 1] by ``x / 127.5 - 1`` and squashed
to 224 x 224 with plain bilinear interpolation (align_corners False, no antialias, aspect ratio
not kept), ``normalize=False``.

Networks: :func:`build_lpips` gives the real metric (AlexNet ImageNet weights read from
torchvision's cache, or from a file; the linear layers ship with the lpips package), a random
backbone for tests (``pnet_rand=True``, seeded), or a full state dict from a file (the stored
model of the conformance cases).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.errors import ModelSourceError

__all__ = ["lpips_input", "lpips_distance", "chstats", "build_lpips", "ALEXNET_FILE"]

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
"""torchvision's AlexNet ImageNet weights (``AlexNet_Weights.IMAGENET1K_V1``), as cached in
``$TORCH_HOME/hub/checkpoints/``; what ``lpips.LPIPS(net='alex')`` loads."""

# AlexNet's ``features`` index -> the lpips slice holding it (slice1: 0-1, slice2: 2-4, ...).
_SLICES = [(1, range(0, 2)), (2, range(2, 5)), (3, range(5, 8)), (4, range(8, 10)),
           (5, range(10, 12))]


def lpips_input(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """``uint8 (H, W, 3)`` -> float32 ``[1, 3, 224, 224]``: ``x / 127.5 - 1`` then
    ``F.interpolate(..., (224, 224), mode='bilinear')`` (the similarity script's inputs)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float() / 127.5 - 1
    x = x.permute(2, 0, 1)[None]
    return F.interpolate(x, (size, size), mode="bilinear")


def lpips_distance(net: torch.nn.Module, source: np.ndarray, edited_resized: np.ndarray,
                   record: dict | None = None) -> torch.Tensor:
    """LPIPS(AlexNet) between the source and the edited image already at the source size.

    Returns:
        float32 scalar tensor (the value the script appends to ``all_lpips``).
    """
    device = next(net.parameters()).device
    a, b = lpips_input(source), lpips_input(edited_resized)
    if record is not None:
        record.update(source=a, edited=b)
    with torch.no_grad():
        return net(a.to(device), b.to(device)).reshape(()).float().cpu()


def chstats(x: torch.Tensor) -> torch.Tensor:
    """``[4, 3]`` float64 stats of a ``[1, 3, H, W]`` tensor: per-channel mean, std (unbiased),
    value at (0, 0) and at (111, 57) (what the conformance cases record of model inputs)."""
    x = x[0].double()
    return torch.stack([x.mean(dim=(1, 2)), x.std(dim=(1, 2)), x[:, 0, 0], x[:, 111, 57]])


def _alexnet_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def build_lpips(weights: str = "pretrained", path: str | None = None, seed: int = 0,
                download: bool = False) -> torch.nn.Module:
    """An ``lpips.LPIPS(net='alex')`` network, float32, eval mode, frozen, on the CPU.

    Args:
        weights: ``"pretrained"``: the published metric (AlexNet ImageNet backbone + the lpips
            package's v0.1 linear layers); ``"random"``: a random backbone built with
            ``pnet_rand=True`` under ``seed`` (tests, CPU smoke runs; numbers are meaningless);
            ``"state_dict"``: every tensor from ``path`` (``.safetensors`` or ``.pth``, e.g. the
            ``lpips.safetensors`` of a conformance case), loaded strictly.
        path: for ``"pretrained"``, the AlexNet weights file (default: torchvision's cache,
            ``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``); for ``"state_dict"``, the
            LPIPS state dict.
        seed: seed of the random backbone.
        download: for ``"pretrained"`` without a cached file, let torchvision download it.

    Raises:
        ModelSourceError: the weights file is missing (saying where to put it).
    """
    import lpips

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # lpips passes torchvision's deprecated ``pretrained=`` argument; the backbone is
        # built random here and the ImageNet weights are loaded below, without a download.
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(int(seed))
        net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    if weights == "random":
        pass
    elif weights == "pretrained":
        f = Path(path).expanduser() if path else _alexnet_cache()
        if f.is_file():
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
        elif path is None and download:
            from torchvision.models import AlexNet_Weights

            sd = AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        else:
            raise ModelSourceError(
                f"LPIPS: AlexNet ImageNet weights not found at {f}; copy torchvision's "
                f"{ALEXNET_FILE} there (or set eval.lpips.path=FILE, or eval.lpips.download=true "
                "with network access), or use eval/lpips=random for a smoke test")
        mapped = {}
        for k, v in sd.items():
            if not k.startswith("features."):
                continue
            idx = int(k.split(".")[1])
            s = next(s for s, r in _SLICES if idx in r)
            mapped[f"net.slice{s}.{k[len('features.'):]}"] = v.float()
        missing = [k for k in net.state_dict() if k.startswith("net.") and k not in mapped]
        if missing:
            raise ModelSourceError(f"LPIPS: {f} is not an AlexNet state dict (missing {missing[:3]})")
        net.load_state_dict(mapped, strict=False)
    elif weights == "state_dict":
        if not path or not Path(path).expanduser().is_file():
            raise ModelSourceError(f"LPIPS state dict file not found: {path!r}")
        p = Path(path).expanduser()
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    else:
        raise ValueError(f"LPIPS weights must be 'pretrained', 'random' or 'state_dict', got {weights!r}")
    net.float().eval().requires_grad_(False)
    net.description = {"pretrained": "LPIPS-alex v0.1", "random": f"LPIPS-alex random-backbone(seed={seed})",
                       "state_dict": f"LPIPS-alex({Path(str(path)).name})"}[weights]
    return net
