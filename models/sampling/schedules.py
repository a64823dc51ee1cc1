"""Timestep schedules for flow-matching samplers (t runs from 1 = noise to 0 = image)."""

from __future__ import annotations

import torch


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Move time toward noise: t' = s t / (1 + (s - 1) t); s = 1 is the identity."""
    return shift * t / (1 + (shift - 1) * t)


def flow_timesteps(steps: int, shift: float = 1.0) -> list[float]:
    """steps + 1 decreasing times from 1 to 0, evenly spaced before the shift."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return [float(v) for v in shift_time(u, shift)]
