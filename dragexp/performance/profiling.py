"""Measuring an edit's stages: FLOPs, kernel launches, peak memory, the device's peak.

:class:`StageProbe` is a stage observer (:func:`dragexp.core.stages.observe_stages`): for every stage
a :class:`~dragexp.core.stages.StageTimer` times, it records the FLOPs PyTorch's
``FlopCounterMode`` counts (matrix products, convolutions and attention, forward and
backward; elementwise work is not counted), the number of dispatched ops that launch a kernel
(:data:`NO_KERNEL` lists the ones that only make views), and the peak memory.
``scripts/bench.py`` turns these into UNet forward-equivalents, achieved TFLOP/s, the share of
the device's peak, and launches.

Launches matter because at 512 px a batch-1 UNet call does not fill an H100: the measured
forward took the same 29 ms at batch 1 and 2 (docs/benchmarks/h100_*.json), so an eager GPU
edit costs about its number of kernel launches times a fixed per-launch price, whatever the
FLOPs. The count is device-independent, so the CPU benchmark measures it too.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

# Dense tensor-core peaks in TFLOP/s from NVIDIA's datasheets (SXM parts), by compute dtype.
_GPU_PEAKS = {
    "H200": {"half": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"half": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"half": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def _register_cpu_attention_flops() -> None:
    """PyTorch counts the CUDA attention kernels; the CPU's flash kernel is counted the same."""
    ops = torch.ops.aten
    fwd = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    registry = flop_counter.flop_registry
    if fwd is not None and fwd.default not in registry:
        @flop_counter.register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop(query_shape, key_shape, value_shape)

    if bwd is not None and bwd.default not in registry:
        @flop_counter.register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                 **kwargs) -> int:
            return flop_counter.sdpa_backward_flop(grad_out_shape, query_shape, key_shape,
                                                   value_shape)


_register_cpu_attention_flops()


# Dispatched ops that only make a view, reshape metadata or allocate: no kernel runs.
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand",
    "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "chunk", "unbind",
    "as_strided", "alias", "detach", "lift_fresh", "empty", "empty_like", "empty_strided",
})


def _shape(value):
    """``value`` with each tensor in it replaced by its shape (what the FLOP formulas read)."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (list, tuple)):
        return [_shape(v) for v in value]
    return value


def _matmul_flops(a_shape, b_shape) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


# torch's addmm formula calls its own pytree-wrapped mm formula; the two matrix products a
# linear layer dispatches to are counted here directly, by the same 2*m*k*n.
_DIRECT_FORMULAS = {
    torch.ops.aten.mm: lambda a, b, *args, **kwargs: _matmul_flops(a, b),
    torch.ops.aten.addmm: lambda bias, a, b, *args, **kwargs: _matmul_flops(a, b),
}


class FlopSum(TorchDispatchMode):
    """Sums PyTorch's registered FLOP formulas over every op run inside the block, and counts
    the ops that launch a kernel (``launches``).

    The same formulas as ``FlopCounterMode`` without its per-module bookkeeping, which costs
    several times the run itself on a small model; ``get_total_flops()`` after the block.
    A dispatched op is a proxy for a launch: a few CUDA ops launch more than one kernel.
    """

    def __init__(self):
        super().__init__()
        self.total = 0
        self.by_op: Counter[str] = Counter()      # launches per op (``add``, ``convolution``...)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet.__name__ not in NO_KERNEL:
            self.by_op[packet.__name__] += 1
        formula = flop_counter.flop_registry.get(packet)
        if formula is not None:
            raw = _DIRECT_FORMULAS.get(packet) or getattr(formula, "__wrapped__", None)
            if raw is None:
                self.total += int(formula(*args, **kwargs, out_val=out))
            else:
                # The registry's shape wrapper maps tensors to shapes with a general pytree
                # walk, a large part of the counter's own cost on a small model; the
                # arguments here are tensors, scalars and lists, mapped directly.
                self.total += int(raw(*[_shape(a) for a in args], out_shape=_shape(out),
                                      **{k: _shape(v) for k, v in kwargs.items()}))
        return out

    def get_total_flops(self) -> int:
        return self.total

    @property
    def launches(self) -> int:
        return sum(self.by_op.values())


def count_flops() -> FlopSum:
    return FlopSum()


@dataclass
class StageRecord:
    seconds: float = 0.0
    flops: int = 0
    launches: int = 0
    peak_bytes: int = 0          # CUDA: max allocated during the stage; CPU: process peak RSS


@dataclass
class StageProbe:
    """Observer recording FLOPs (when ``count``) and peak memory per stage."""

    count: bool = False
    stages: dict[str, StageRecord] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        rec = self.stages.setdefault(name, StageRecord())
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        counter = count_flops() if self.count else nullcontext()
        t0 = time.perf_counter()
        with counter:
            yield
        if cuda:
            torch.cuda.synchronize()
        rec.seconds += time.perf_counter() - t0
        if self.count:
            rec.flops += int(counter.get_total_flops())
            rec.launches += counter.launches
        peak = torch.cuda.max_memory_allocated() if cuda else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rec.peak_bytes = max(rec.peak_bytes, int(peak))


def unet_forward_work(unet, latent_hw: tuple[int, int], text: torch.Tensor) -> FlopSum:
    """FLOPs (``total``) and kernel launches (``launches``, ``by_op``) of one batch-1 no-grad
    UNet forward at ``latent_hw``, as the UNet is now (adapters, processors): the units of
    forward-equivalents. A first, uncounted call makes it the steady-state call of an edit
    (the fast path's per-edit work, e.g. the prompt's cross-attention keys/values, done)."""
    p = next(unet.parameters())
    x = torch.zeros(1, unet.config.in_channels, *latent_hw, device=p.device, dtype=p.dtype)
    text = text.to(p)
    with torch.no_grad():
        unet(x, 500, encoder_hidden_states=text, return_dict=False)
        with count_flops() as counter:
            unet(x, 500, encoder_hidden_states=text, return_dict=False)
    return counter


def unet_forward_seconds(unet, latent_hw: tuple[int, int], text: torch.Tensor, batch: int = 1,
                         precision: str = "32-true", repeats: int = 3) -> float:
    """Wall seconds of one no-grad UNet forward (best of ``repeats`` after one warm-up) under
    ``precision``'s autocast: the floor of a stage made of such calls."""
    from ..core.stages import _sync

    p = next(unet.parameters())
    x = torch.zeros(batch, unet.config.in_channels, *latent_hw, device=p.device, dtype=p.dtype)
    text = text.to(p).expand(batch, -1, -1)
    half = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    autocast = torch.autocast(p.device.type, dtype=half) if half and p.device.type == "cuda" \
        else nullcontext()
    best = float("inf")
    with torch.no_grad(), autocast:
        for i in range(repeats + 1):
            _sync()
            t0 = time.perf_counter()
            unet(x, 500, encoder_hidden_states=text, return_dict=False)
            _sync()
            if i:
                best = min(best, time.perf_counter() - t0)
    return best


def compute_class(precision: str) -> str:
    """Which peak applies: half-precision tensor cores under mixed precision, else fp32 (or
    TF32 when PyTorch is allowed to use it for fp32 matrix products)."""
    if precision in ("16-mixed", "bf16-mixed", "16-true", "bf16-true"):
        return "half"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def measured_cpu_peak(n: int = 1024, repeats: int = 3) -> float:
    """fp32 matrix-product TFLOP/s of this CPU with torch's current threads (best of a few)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def device_peak(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, where the number comes from) for this device and precision."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = compute_class(precision)
        for key, peaks in _GPU_PEAKS.items():
            if key in name:
                return peaks[kind], f"{name}, {kind} dense datasheet peak"
        return None, f"{name}: no datasheet peak known"
    return measured_cpu_peak(), "this CPU's measured fp32 matrix-product rate"
