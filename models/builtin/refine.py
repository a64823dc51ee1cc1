"""A full-resolution convolution stage after the DiT's patch head (v3).

The DiT predicts velocity per 4x4 patch; the clean-image estimate it implies,
x0 = x_t - t v, carries the noise the head failed to reproduce exactly (speckle) and
edges cut at patch borders. A few 3x3 convolutions over that estimate, the input and
t correct x0 at pixel level (a "2-px patch stage" at a fraction of a token stage's
cost); the correction goes back into velocity so samplers, caches and engines see the
same v-prediction model. The last layer starts at zero: the stage begins as identity,
so it can be added to a trained checkpoint and fine-tuned.
"""

from __future__ import annotations

import torch
from torch import nn

T_MIN = 0.05  # v = v_patch - R / max(t, T_MIN): no blow-up near t = 0


class PixelRefiner(nn.Module):
    def __init__(self, channels: int, width: int, layers: int = 4) -> None:
        super().__init__()
        convs: list[nn.Module] = [nn.Conv2d(2 * channels + 1, width, 3, padding=1), nn.SiLU()]
        for _ in range(layers - 2):
            convs += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        convs.append(nn.Conv2d(width, channels, 3, padding=1))
        nn.init.zeros_(convs[-1].weight)
        nn.init.zeros_(convs[-1].bias)
        self.net = nn.Sequential(*convs)

    def forward(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The corrected velocity for patch velocity v at input x (B, C, H, W), time t (B,)."""
        col = t.to(v.dtype).view(-1, 1, 1, 1)
        x0 = x.to(v.dtype) - col * v
        tmap = col.expand(-1, 1, *v.shape[2:])
        r = self.net(torch.cat([x0, x.to(v.dtype), tmap], dim=1))
        return v - r / col.clamp_min(T_MIN)
