"""AB-Cache: predict a skipped step's denoiser output from the last k computed ones.

Polynomial (Adams-Bashforth-style) extrapolation in time through the last k
computed outputs, written in Lagrange form so unequal step sizes (shifted
schedules) are exact: for equal spacing it reduces to 2*O1 - O2 (k=2) and
3*O1 - 3*O2 + O3 (k=3). First and last steps are always computed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .config import CacheConfig


@dataclass(frozen=True)
class ABState:
    """Per-request history: times and outputs of computed steps, newest first."""

    times: tuple[float, ...] = ()
    outputs: tuple[torch.Tensor, ...] = ()
    skips_in_row: int = 0
    skipped: int = 0  # steps predicted instead of computed, for metrics


def lagrange_weights(times: tuple[float, ...], t: float) -> list[float]:
    """Weights w_i with p(t) = sum w_i O_i for the polynomial through (times[i], O_i)."""
    out = []
    for i, ti in enumerate(times):
        w = 1.0
        for j, tj in enumerate(times):
            if j != i:
                w *= (t - tj) / (ti - tj)
        out.append(w)
    return out


def predict(state: ABState, t: float, order: int) -> torch.Tensor:
    k = min(order, len(state.times))
    weights = lagrange_weights(state.times[:k], t)
    return sum(w * o for w, o in zip(weights, state.outputs[:k]))


def error_estimate(state: ABState, t: float, order: int) -> float:
    """Relative gap between the order-k and order-(k-1) predictions: a cheap local
    error proxy that needs no forward."""
    k = min(max(order, 2), len(state.times))
    if k < 2:
        return float("inf")
    hi, lo = predict(state, t, k), predict(state, t, k - 1)
    return float(torch.linalg.norm(hi - lo) / (torch.linalg.norm(state.outputs[0]) + 1e-12))


def must_compute(cfg: CacheConfig, state: ABState, step: int, steps: int, t: float) -> bool:
    if step == 0 or step == steps - 1 or not state.times:
        return True
    if state.skips_in_row >= cfg.max_skips:
        return True
    if cfg.threshold is not None:
        return error_estimate(state, t, cfg.order) >= cfg.threshold
    return state.skips_in_row >= cfg.interval - 1  # a full compute every `interval` steps


def record(state: ABState, t: float, v: torch.Tensor, order: int) -> ABState:
    keep = max(order, 2)  # one extra for the adaptive estimate
    return replace(state, times=(t, *state.times)[:keep], outputs=(v, *state.outputs)[:keep],
                   skips_in_row=0)


def skipped(state: ABState) -> ABState:
    return replace(state, skips_in_row=state.skips_in_row + 1, skipped=state.skipped + 1)
