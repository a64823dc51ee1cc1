"""The built-in denoiser: a small pixel-space DiT with adaLN-Zero blocks.

Conditioning: time t and step size d (shortcut models) plus the z-scored pooled
MiniLM vector go through adaLN; MiniLM token states go through cross-attention.
Attention is written out by hand: on these CPUs it trains faster than
scaled_dot_product_attention, whose backward dominated a step.

The forward is split into `embed` / `blocks` / `head` so that block caches
(first-blocks, TeaCache, LazyDiT) can run the pieces themselves.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .refine import PixelRefiner
from .text import TEXT_DIM, TextBatch


@dataclass(frozen=True)
class DiTConfig:
    image_size: int = 32
    channels: int = 3
    patch: int = 4
    hidden: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = TEXT_DIM
    time_shift: float = 3.0  # t' = s*t / (1 + (s-1)*t), in training and sampling
    refine: int = 0  # width of the full-resolution conv stage (refine.py); 0: none (v2)

    def __post_init__(self) -> None:
        if self.image_size % self.patch or self.hidden % self.heads:
            raise ValueError("image_size must divide by patch and hidden by heads")

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    coords = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter) / quarter))
    parts = []
    for c in (yy.flatten(), xx.flatten()):
        args = c[:, None] * freqs[None]
        parts += [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, N, D) attention; key_mask (B, M) is True for keys to attend to."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        ctx = x if ctx is None else ctx
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, key_mask)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention + MLP, with (unmodulated) cross-attention to text."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(h, cfg.heads)
        self.norm_x = nn.LayerNorm(h, eps=1e-6)
        self.cross = Attention(h, cfg.heads)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(h, int(h * cfg.mlp_ratio)), nn.GELU(),
                                 nn.Linear(int(h * cfg.mlp_ratio), h))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.ada(c).chunk(6, dim=-1)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor,
                ctx_mask: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(c)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        x = x + self.cross(self.norm_x(x), ctx, ctx_mask)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


@dataclass
class DiTInputs:
    """What every block needs besides the hidden state: conditioning vector and text context."""

    c: torch.Tensor
    ctx: torch.Tensor
    ctx_mask: torch.Tensor
    x: torch.Tensor | None = None  # the model's input and time: the refine stage's inputs
    t: torch.Tensor | None = None


class DiT(nn.Module):
    """Velocity model v(x_t, t, d, text) for x_t = (1 - t) x0 + t * noise."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, p = cfg.hidden, cfg.patch
        self.patch_in = nn.Linear(cfg.channels * p * p, h)
        self.register_buffer("pos", sincos_2d(cfg.image_size // p, h), persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        self.d_mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        self.pooled_in = nn.Linear(cfg.text_dim, h)
        self.text_in = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, h))
        # z-scoring of the pooled sentence vector, fitted on training captions.
        self.register_buffer("pooled_mean", torch.zeros(cfg.text_dim))
        self.register_buffer("pooled_std", torch.ones(cfg.text_dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))
        self.patch_out = nn.Linear(h, cfg.channels * p * p)
        for m in (self.ada_out[1], self.patch_out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.refiner = PixelRefiner(cfg.channels, cfg.refine) if cfg.refine else None

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        p = self.cfg.patch
        x = x.reshape(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (hgt // p) * (wid // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p, c, g = self.cfg.patch, self.cfg.channels, self.cfg.image_size // self.cfg.patch
        x = x.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, g * p, g * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
              text: TextBatch) -> tuple[torch.Tensor, DiTInputs]:
        h = self.cfg.hidden
        tokens = self.patch_in(self.patchify(x)) + self.pos
        pooled = (text.pooled - self.pooled_mean) / self.pooled_std
        c = (self.t_mlp(timestep_embedding(t, h)) + self.d_mlp(timestep_embedding(d, h))
             + self.pooled_in(pooled))
        return tokens, DiTInputs(c, self.text_in(text.tokens), text.mask, x, t)

    def patch_head(self, x: torch.Tensor, inputs: DiTInputs) -> torch.Tensor:
        """Per-token velocity patches (B, N, C*p*p)."""
        shift, scale = self.ada_out(inputs.c).chunk(2, dim=-1)
        return self.patch_out(modulate(self.norm_out(x), shift, scale))

    def finish(self, patches: torch.Tensor, inputs: DiTInputs) -> torch.Tensor:
        """The velocity image from all tokens' patches, through the refine stage if any."""
        v = self.unpatchify(patches)
        if self.refiner is None:
            return v
        if inputs.x is None or inputs.t is None:
            raise ValueError("the refine stage needs the model's input x and time t")
        return self.refiner(v, inputs.x, inputs.t)

    def head(self, x: torch.Tensor, inputs: DiTInputs) -> torch.Tensor:
        return self.finish(self.patch_head(x, inputs), inputs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                text: TextBatch) -> torch.Tensor:
        h, inputs = self.embed(x, t, d, text)
        for block in self.blocks:
            h = block(h, inputs.c, inputs.ctx, inputs.ctx_mask)
        return self.head(h, inputs)
