"""Captured steps (``speed=graphs``): each step of an optimisation as compiled graphs.

A drag or LoRA step is three graphs (issue 20; tests/test_graph_capture.py):

1. the forward, from the optimised tensor to what the loss reads (eps, features, x_{t-1}),
   UNet included, compiled with ``fullgraph=True``: a graph break is an error, not a silent
   fall-back. Feature taps, attention controllers and cached reference keys/values are set up
   once per optimisation, outside the graph (:meth:`dragexp.drag.targets.LatentTarget.
   step_forward`), so the traced call sees only tensors and the hooks' pure functions;
2. its backward, which AOTAutograd traces with the forward as one graph;
3. the optimiser step (Adam/AdamW, ``torch.compile`` of ``optimizer.step``).

Between them, in eager mode, run the few small ops whose shapes depend on where the points
are (the drag's point losses, tracking and stop rule: patches indexed by the handles, clipped at
the border as the authors' code clips them); they launch tens of kernels against the UNet's
hundreds.

On CUDA the graphs are replayed as CUDA graphs (``mode="reduce-overhead"``); outputs that
outlive a replay are cloned by their owners. On the CPU the same graphs run through
AOTAutograd with eager kernels (backend ``aot_eager``): correctness, not speed.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class StepCapture:
    """How to compile a step's graphs.

    Attributes:
        backend: ``torch.compile`` backend (``inductor``, ``aot_eager``, ...).
        mode: ``torch.compile`` mode (``reduce-overhead``: CUDA graphs), or None.
    """

    backend: str = "aot_eager"
    mode: str | None = None

    @classmethod
    def for_device(cls, device: torch.device | str, backend: str = "auto") -> "StepCapture":
        """``auto``: inductor with CUDA graphs on CUDA, ``aot_eager`` on the CPU."""
        device = torch.device(device)
        if backend == "auto":
            return cls("inductor", "reduce-overhead") if device.type == "cuda" else cls()
        return cls(backend, "reduce-overhead" if backend == "inductor" and device.type == "cuda"
                   else None)

    @property
    def cuda_graphs(self) -> bool:
        return self.mode == "reduce-overhead"

    def compile(self, fn: Callable) -> Callable:
        """``fn`` as one graph (``fullgraph=True``, static shapes)."""
        _raise_recompile_limit()
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=self.backend,
                             **({"mode": self.mode} if self.mode else {}))

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        """``optimizer.step`` as one graph: its update under ``no_grad``.

        The public ``step`` breaks the graph on purpose around its grad-mode switch (so that
        AOT sees an inference graph, pytorch#104053); here the switch happens outside and the
        undecorated update is what is compiled. Step hooks are not run (none is registered on
        the optimisers of dragexp's steps).
        """
        update = inspect.unwrap(type(optimizer).step)
        compiled = self.compile(lambda: update(optimizer))

        def step() -> None:
            with torch.no_grad():
                compiled()
        return step

    def optimizer_kwargs(self) -> dict:
        """Optimiser options a captured step needs: the step count on the device (CUDA graphs)
        and no fused kernel (the compiled step is the fused kernel)."""
        return {"capturable": True} if self.cuda_graphs else {}


def optimizer_step(optimizer, capture: StepCapture | None) -> None:
    """One optimiser step: ``optimizer.step()`` in eager mode, or its compiled update
    (:meth:`StepCapture.optimizer_step`, traced on the first step and kept on the optimiser).

    ``optimizer`` may be Lightning's wrapper; the compiled update is the wrapped optimiser's.
    """
    if capture is None:
        optimizer.step()
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    step = getattr(inner, "_dragexp_captured_step", None)
    if step is None:
        step = inner._dragexp_captured_step = capture.optimizer_step(inner)
    step()


def _raise_recompile_limit() -> None:
    # One process captures the steps of many edits (new tensors, new shapes per sample); the
    # default limit of 8 graphs per code object would silently fall back to eager.
    import torch._dynamo as dynamo

    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, limit):
            setattr(dynamo.config, limit, max(getattr(dynamo.config, limit), 256))


def outlives_replay(t: torch.Tensor, capture: StepCapture | None) -> torch.Tensor:
    """``t`` detached, cloned when a CUDA-graph replay would overwrite it."""
    t = t.detach()
    return t.clone() if capture is not None and capture.cuda_graphs else t


class CapturedUNet:
    """While entered, the UNet's calls run as compiled graphs (inversion, denoising, guidance).

    ``unet(x, t, encoder_hidden_states=text, return_dict=False)`` keeps its signature; the
    timestep is handed to the graph as a 0-d tensor on the UNet's device (one per value, made
    once), so the steps of a loop differ only in tensor values and share one graph. What the
    attention controllers and feature taps installed around the loop do is traced into that
    graph; their per-step state is read from tensors (:attr:`dragexp.core.attention.
    AttentionController.step_tensor`). Outputs are cloned when a CUDA-graph replay would
    overwrite them.
    """

    def __init__(self, unet: torch.nn.Module, capture: StepCapture):
        self.unet = unet
        self.capture = capture
        self._timesteps: dict[tuple, torch.Tensor] = {}
        forward = type(unet).forward

        def call(x, t, text):
            return forward(unet, x, t, encoder_hidden_states=text, return_dict=False)[0]
        self._compiled = capture.compile(call)

    def _timestep(self, t, device) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            return t
        key = (int(t), device)
        cached = self._timesteps.get(key)
        if cached is None:
            cached = self._timesteps[key] = torch.tensor(int(t), dtype=torch.int64, device=device)
        return cached

    def __call__(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        if kwargs or return_dict:
            # what the graph does not cover runs as it always did
            return type(self.unet).forward(self.unet, sample, timestep,
                                           encoder_hidden_states=encoder_hidden_states,
                                           return_dict=return_dict, **kwargs)
        eps = self._compiled(sample, self._timestep(timestep, sample.device),
                             encoder_hidden_states)
        # clone (not detach): a guidance step differentiates through the call
        return (eps.clone() if self.capture.cuda_graphs else eps,)

    def __enter__(self) -> "CapturedUNet":
        self.unet.forward = self
        return self

    def __exit__(self, *exc) -> None:
        self.unet.__dict__.pop("forward", None)


def captured_unet(unet: torch.nn.Module, capture: StepCapture | None):
    """:class:`CapturedUNet` as a context, or a no-op context when ``capture`` is None."""
    return nullcontext() if capture is None else CapturedUNet(unet, capture)
