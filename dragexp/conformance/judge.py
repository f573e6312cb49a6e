"""PASS/FAIL rule of ../shared/conformance/README.md, "What passes"."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Keys that are chained optimiser trajectories (or computed from them); they get the looser
# mean/max rule (c) as well as the strict one. Matched on the key or its prefix before ".".
CHAINED = (
    "latent_after_step", "optimized_latent", "bottleneck_after_step", "bottleneck_per_iteration",
    "optimized_bottleneck", "injected_bottleneck", "final_latent", "weight_per_step",
    "lora_final", "latent_trajectory", "optimized", "final", "denoise", "sampled", "edited",
)


def is_chained(key: str) -> bool:
    base = key.split(".")[0]
    return any(base.startswith(c) or c in base for c in CHAINED)


@dataclass
class Verdict:
    key: str
    ok: bool
    detail: str
    max_abs: float = 0.0


def judge_key(key: str, produced: torch.Tensor | None, expected: torch.Tensor) -> Verdict:
    if produced is None:
        return Verdict(key, False, "missing")
    produced = torch.as_tensor(produced)
    if tuple(produced.shape) != tuple(expected.shape):
        return Verdict(key, False, f"shape {tuple(produced.shape)} != {tuple(expected.shape)}")
    if expected.numel() == 0:
        return Verdict(key, True, "empty")
    e = expected.double()
    p = produced.double()
    enan, pnan = torch.isnan(e), torch.isnan(p)
    if not torch.equal(enan, pnan):
        return Verdict(key, False, f"NaN pattern differs ({int(enan.sum())} expected, "
                       f"{int(pnan.sum())} produced)")
    fin = ~enan
    e, p = e[fin], p[fin]
    if e.numel() == 0:
        return Verdict(key, True, "all NaN as expected")
    diff = (p - e).abs()
    if torch.isinf(e).any() or torch.isinf(p).any():
        same_inf = torch.equal(torch.isinf(e), torch.isinf(p)) and torch.equal(e[torch.isinf(e)], p[torch.isinf(p)])
        fe = ~torch.isinf(e)
        diff = (p[fe] - e[fe]).abs() if same_inf else torch.full((1,), float("inf"), dtype=torch.float64)
        if diff.numel() == 0:
            return Verdict(key, same_inf, "inf")
    mx = float(diff.max())
    integer_like = (not expected.is_floating_point()) or bool(torch.all(e == torch.round(e)))
    if not expected.is_floating_point() or (integer_like and _is_discrete_key(key)):
        return Verdict(key, mx <= 0.5, f"max|d|={mx:.3g} (exact)", mx)
    scale = max(1.0, float(e.abs().max()))
    if mx <= 1e-3 * scale:
        return Verdict(key, True, f"max|d|={mx:.3g} (tol {1e-3 * scale:.3g})", mx)
    if is_chained(key):
        mean = float(diff.mean())
        ok = mean <= 1e-3 * scale and mx <= 0.05 * scale
        return Verdict(key, ok, f"max|d|={mx:.3g} mean|d|={mean:.3g} (chained, scale {scale:.3g})", mx)
    return Verdict(key, False, f"max|d|={mx:.3g} > {1e-3 * scale:.3g}", mx)


DISCRETE_HINTS = ("point", "mask", "flag", "count", "num_", "trajectory", "handle", "target",
                  "stopped", "injected", "timestep", "idx", "index", "step", "hw", "high",
                  "offset", "moved", "update", "reached", "shape", "size", "layers")


def _is_discrete_key(key: str) -> bool:
    k = key.lower()
    if "loss_trajectory" in k or "latent" in k or "bottleneck" in k or "grad" in k:
        return False
    return any(h in k for h in DISCRETE_HINTS)
