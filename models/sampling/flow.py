"""Pure step functions for flow-matching samplers.

Convention: x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0.
Each function works on a batch whose members may sit at different times.
"""

from __future__ import annotations

import torch


def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def euler_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
               t_next: torch.Tensor) -> torch.Tensor:
    return x + _col(t_next - t, x) * v


def predict_x0(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's current clean-image estimate (the natural preview)."""
    return x - _col(t, x) * v


def apply_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor,
                   scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance with a per-sample scale."""
    return v_uncond + _col(scale, v_cond) * (v_cond - v_uncond)
