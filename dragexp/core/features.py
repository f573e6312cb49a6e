"""UNet feature taps: forward hooks on the UNet's own modules.

Feature index convention (docs/methods.md, Shared 4; DragDiffusion's
``forward_unet_features``): 0 = output of ``mid_block``, 1..4 = outputs of ``up_blocks[0..3]``.
Hooks read the real module outputs; the UNet's forward is diffusers' own (the one block that
dragexp re-writes is the fast path's ``ResnetBlock2D`` forward, :mod:`dragexp.performance.lean_unet`,
equal to diffusers' by test).
The same hook machinery can also *replace* a module's output (DragNoise's bottleneck
substitution), so a method that needs a modified forward asks for a replacement, not a fork.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

NUM_FEATURE_INDICES = 5


def feature_module(unet: nn.Module, index: int) -> nn.Module:
    """The module whose output is feature ``index`` (0 = mid block, k = ``up_blocks[k-1]``)."""
    n_up = len(unet.up_blocks)
    if not 0 <= index <= n_up:
        raise ValueError(f"feature index must be in 0..{n_up} (0 = mid block, 1..{n_up} = "
                         f"up_blocks[0..{n_up - 1}]), got {index}")
    return unet.mid_block if index == 0 else unet.up_blocks[index - 1]


class FeatureTap:
    """Records the outputs of the selected feature modules on every UNet forward.

    Use as a context manager around the UNet call; ``tap.features`` then holds one tensor per
    requested index, in the order requested, from the most recent forward. Tensors keep their
    autograd graph, so a forward with gradient gives features with gradient.
    """

    def __init__(self, unet: nn.Module, indices: Sequence[int]):
        self.unet = unet
        self.indices = [int(i) for i in indices]
        self.modules = [feature_module(unet, i) for i in self.indices]
        self._out: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, slot: int):
        def hook(_module, _inputs, output):
            self._out[slot] = output[0] if isinstance(output, tuple) else output
        return hook

    def __enter__(self) -> "FeatureTap":
        self._out.clear()
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def features(self) -> list[torch.Tensor]:
        missing = [self.indices[k] for k in range(len(self.indices)) if k not in self._out]
        if missing:
            raise RuntimeError(f"feature indices {missing} were not produced by the last forward")
        return [self._out[k] for k in range(len(self.indices))]

    def take(self) -> list[torch.Tensor]:
        """:attr:`features`, then forget them: the tap holds nothing between forwards, so a
        compiled step finds it in the same (empty) state on every call and is not retraced."""
        out = self.features
        self._out.clear()
        return out


@contextmanager
def replace_output(module: nn.Module, value: torch.Tensor | None,
                   gate: torch.Tensor | None = None) -> Iterator[None]:
    """Within the context, ``module``'s forward output is replaced by ``value``.

    The module still runs (its inputs are what the rest of the network computed), only its
    output is swapped. ``value=None`` leaves the module untouched. Used by DragNoise to feed the
    optimised bottleneck in place of the mid-block output (docs/methods.md, DragNoise 2).
    ``gate``: a 0-d bool tensor; the output is replaced where it holds (``torch.where``), so a
    compiled caller traces one graph for the steps with and without the substitution.
    """
    if value is None:
        yield
        return
    if gate is None:
        hook = lambda _m, _i, _o: value                                         # noqa: E731
    else:
        hook = lambda _m, _i, out: torch.where(gate, value.to(out.dtype), out)  # noqa: E731
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def resize_concat(features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize each map to ``size`` (align_corners False, no antialias), concat on C.

    DragDiffusion's supervision features: the selected UNet features at half the image size.
    """
    return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                      for f in features], dim=1)


def concat_at_finest(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate maps on C after resizing the coarser ones bilinearly to the finest map's size.

    EasyDrag's drag features (docs/methods.md, EasyDrag 6): the ``up_blocks[1]``
    output resized to the ``up_blocks[2]`` output's size and concatenated with it. Maps already
    at that size are used as they are.
    """
    size = max((tuple(f.shape[-2:]) for f in features), key=lambda hw: hw[0] * hw[1])
    return torch.cat([f if tuple(f.shape[-2:]) == size else
                      F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                      for f in features], dim=1)


def concat_then_resize(features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """:func:`concat_at_finest`, then one bilinear resize (align_corners False) to ``size``.

    EasyDrag upsamples the concatenated map x8 to image resolution, so its points stay in image
    pixels; this is the ``compose_features`` strategy of its drag optimisation.
    """
    f = concat_at_finest(features)
    if tuple(f.shape[-2:]) == tuple(size):
        return f
    return F.interpolate(f, size=tuple(size), mode="bilinear", align_corners=False)


def unet_eps_and_features(unet: nn.Module, latent: torch.Tensor, t: int | torch.Tensor,
                          encoder_hidden_states: torch.Tensor, indices: Sequence[int],
                          **unet_kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One UNet forward returning (eps, [feature maps at native resolution])."""
    with FeatureTap(unet, indices) as tap:
        return tapped_forward(unet, tap, latent, t, encoder_hidden_states, **unet_kwargs)


def tapped_forward(unet: nn.Module, tap: FeatureTap, latent: torch.Tensor, t: int | torch.Tensor,
                   encoder_hidden_states: torch.Tensor, **unet_kwargs
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(eps, ``tap.features``) of one UNet forward, ``tap`` entered by the caller: the form a
    captured step compiles (the hooks exist before the graph is traced)."""
    eps = unet(latent, t, encoder_hidden_states=encoder_hidden_states,
               return_dict=False, **unet_kwargs)[0]
    return eps, tap.take()
