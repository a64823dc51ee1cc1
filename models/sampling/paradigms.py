"""ParaDiGMS (Shih et al., 2023): Picard iteration over a sliding window of steps.

Sequential Euler computes x_{i+1} = x_i + dt_i v(x_i) one step at a time. Picard
iteration guesses the whole window x_k..x_{k+p}, evaluates v at every point in
ONE batched forward, and rebuilds x_{j+1} = x_k + sum_{m<=j} dt_m v_m; points
whose update is below the tolerance are final and the window slides past them.
The number of batched forwards ("rounds") is what a latency-bound request pays;
the extra compute is spread over the batch dimension (one device) or devices.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .flow import predict_x0
from .state import Denoiser, SamplerState, guided_velocity


def paradigms_sample(denoiser: Denoiser, state: SamplerState, window: int = 8,
                     tol: float = 1e-3, max_rounds: int | None = None
                     ) -> tuple[SamplerState, int]:
    """The finished state and the number of batched denoiser rounds it took."""
    if state.step != 0 or state.qsched is not None or state.cache is not None:
        raise ValueError("ParaDiGMS runs whole trajectories without step caches or Q-Sched")
    times = torch.tensor(state.times)
    dt = times[1:] - times[:-1]  # negative: times run 1 -> 0
    n = len(dt)
    xs = [state.x.clone() for _ in range(n + 1)]  # initial guess: the noise everywhere
    start, rounds = 0, 0
    max_rounds = max_rounds or 4 * n
    last_v = None
    while start < n and rounds < max_rounds:
        end = min(n, start + window)
        points = [replace(state, x=xs[j], step=j, x0=None) for j in range(start, end)]
        v, _ = guided_velocity(denoiser, points)
        rounds += 1
        new = [xs[start]]
        acc = xs[start].clone()
        for k, j in enumerate(range(start, end)):
            acc = acc + dt[j] * v[k]
            new.append(acc.clone())
        # converged prefix: the first point whose update exceeds the tolerance stays
        errors = [float(((new[k] - xs[start + k]) ** 2).mean()) for k in range(1, len(new))]
        for k in range(1, len(new)):
            xs[start + k] = new[k]
        moved = next((k for k, e in enumerate(errors) if e > tol * tol), len(errors))
        start += max(1, moved)  # the first point is exact after one round: always advance
        last_v = (v[-1], end - 1)
    v_last, j_last = last_v
    x0 = predict_x0(xs[j_last][None], v_last[None], times[j_last:j_last + 1])[0]
    return replace(state, x=xs[n], step=n, x0=x0), rounds
