"""AB-Cache: predict a skipped step's denoiser output from the last k computed ones.

Polynomial (Adams-Bashforth-style) extrapolation in time through the last k
computed outputs, written in Lagrange form so unequal step sizes (shifted
schedules) are exact: for equal spacing it reduces to 2*O1 - O2 (k=2) and
3*O1 - 3*O2 + O3 (k=3). First and last steps are always computed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .config import CacheConfigError, StepCache


@dataclass(frozen=True)
class ABCacheConfig(StepCache):
    """Extrapolation order k (1 = reuse the last output), and when to compute: one full
    compute every `interval` steps, or (with a threshold) whenever the error estimate
    reaches it; never more than `max_skips` skipped steps in a row."""

    policy: ClassVar[str] = "ab-cache"
    order: int = 2
    interval: int = 2
    threshold: float | None = None
    max_skips: int = 3

    def validate(self) -> None:
        if not 1 <= self.order <= 3:
            raise CacheConfigError("order", "order must be 1, 2 or 3")
        if self.interval < 1:
            raise CacheConfigError("interval", "interval must be at least 1")
        if self.threshold is not None and not self.threshold > 0:
            raise CacheConfigError("threshold", "threshold must be positive")
        if self.max_skips < 1:
            raise CacheConfigError("max_skips", "max_skips must be at least 1")

    def new_state(self) -> ABState:
        return ABState()

    def must_compute(self, state: ABState, step: int, steps: int, t: float) -> bool:
        return must_compute(self, state, step, steps, t)

    def record(self, state: ABState, t: float, out: torch.Tensor) -> ABState:
        return record(state, t, out, self.order)

    def predict(self, state: ABState, t: float) -> torch.Tensor:
        return predict(state, t, self.order)

    def skipped(self, state: ABState) -> ABState:
        return skipped(state)

    def forwards(self, steps: int) -> int:
        """The fixed-interval pattern, counted; an adaptive threshold may compute every
        step, so it counts all of them."""
        if self.threshold is not None:
            return steps
        run, in_row = 0, 0
        for step in range(steps):
            if step in (0, steps - 1) or in_row >= min(self.max_skips, self.interval - 1):
                run, in_row = run + 1, 0
            else:
                in_row += 1
        return run


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
    out = weights[0] * state.outputs[0]
    for w, o in zip(weights[1:], state.outputs[1:k]):
        out = out + w * o
    return out


def error_estimate(state: ABState, t: float, order: int) -> float:
    """Relative gap between the order-k and order-(k-1) predictions: a cheap local
    error proxy that needs no forward."""
    k = min(max(order, 2), len(state.times))
    if k < 2:
        return float("inf")
    hi, lo = predict(state, t, k), predict(state, t, k - 1)
    return float(torch.linalg.norm(hi - lo) / (torch.linalg.norm(state.outputs[0]) + 1e-12))


def must_compute(cfg: ABCacheConfig, state: ABState, step: int, steps: int, t: float) -> bool:
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
