"""ParaDiGMS (Shih et al., 2023): Picard iteration over a sliding window of steps.

Sequential Euler computes x_{i+1} = x_i + dt_i v(x_i) one step at a time. Picard
iteration guesses the whole window x_k..x_{k+p}, evaluates v at every point in
ONE batched forward, and rebuilds x_{j+1} = x_k + sum_{m<=j} dt_m v_m; points
whose update is below the tolerance are final and the window slides past them.
The number of batched forwards ("rounds") is what a latency-bound request pays;
the extra compute is spread over the batch dimension (one device) or devices.

`PicardState` advances one round per call, so the scheduler can interleave it
with other work and fall back to plain steps from the converged prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .flow import predict_x0
from .state import Denoiser, SamplerState, guided_velocity


@dataclass
class PicardState:
    base: SamplerState  # the request's state when Picard sampling started (step 0 ...)
    xs: list[torch.Tensor]  # guesses x_0 .. x_n
    start: int  # xs[:start + 1] have converged
    window: int
    tol: float
    rounds: int = 0
    x0: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.xs) - 1

    @property
    def done(self) -> bool:
        return self.start >= self.steps

    def as_sampler_state(self) -> SamplerState:
        """The converged prefix as a plain state (to continue step by step)."""
        return replace(self.base, x=self.xs[self.start], step=self.start, x0=self.x0)


def picard_init(state: SamplerState, window: int = 8, tol: float = 1e-3) -> PicardState:
    if state.qsched is not None or state.cache is not None:
        raise ValueError("ParaDiGMS runs without step caches or Q-Sched")
    n = state.steps
    xs = [state.x.clone() for _ in range(n + 1)]  # initial guess: the current sample
    return PicardState(state, xs, state.step, window, tol)


def picard_round(denoiser: Denoiser, p: PicardState) -> PicardState:
    """One batched forward over the window, then slide past the converged points."""
    return picard_rounds(denoiser, [p])[0]


def picard_rounds(denoiser: Denoiser, ps: list[PicardState]) -> list[PicardState]:
    """One round for each of several requests, all their windows in ONE forward."""
    live = [p for p in ps if not p.done]
    spans = [(p.start, min(p.steps, p.start + p.window)) for p in live]
    points = [replace(p.base, x=p.xs[j], step=j, x0=None)
              for p, (start, end) in zip(live, spans) for j in range(start, end)]
    if not points:
        return ps
    v, _ = guided_velocity(denoiser, points)
    offset = 0
    for p, (start, end) in zip(live, spans):
        _update(p, start, end, v[offset:offset + end - start])
        offset += end - start
    return ps


def _update(p: PicardState, start: int, end: int, v: torch.Tensor) -> None:
    """Rebuild the window from its velocities; converged points are final."""
    times = torch.tensor(p.base.times)
    dt = times[1:] - times[:-1]  # negative: times run 1 -> 0
    acc, errors = p.xs[start].clone(), []
    for k, j in enumerate(range(start, end)):
        acc = acc + dt[j] * v[k]
        errors.append(float(((acc - p.xs[j + 1]) ** 2).mean()))
        p.xs[j + 1] = acc.clone()
    moved = next((k for k, e in enumerate(errors) if e > p.tol * p.tol), len(errors))
    p.start = start + max(1, moved)  # the first point is exact after one round
    p.rounds += 1
    p.x0 = predict_x0(p.xs[end - 1][None], v[-1][None], times[end - 1:end])[0]


def paradigms_sample(denoiser: Denoiser, state: SamplerState, window: int = 8,
                     tol: float = 1e-3, max_rounds: int | None = None
                     ) -> tuple[SamplerState, int]:
    """The finished state and the number of batched denoiser rounds it took."""
    p = picard_init(state, window, tol)
    limit = max_rounds or 4 * p.steps
    while not p.done and p.rounds < limit:
        picard_round(denoiser, p)
    return p.as_sampler_state(), p.rounds


def paradigms_sample_many(denoiser: Denoiser, states: list[SamplerState], window: int = 8,
                          tol: float = 1e-3) -> tuple[list[SamplerState], list[int]]:
    """Several requests by Picard iteration together (their windows share forwards)."""
    ps = [picard_init(s, window, tol) for s in states]
    limit = 4 * max(p.steps for p in ps)
    for _ in range(limit):
        if all(p.done for p in ps):
            break
        picard_rounds(denoiser, ps)
    return [p.as_sampler_state() for p in ps], [p.rounds for p in ps]
