"""LazyDiT at serving time: learned per-block gates decide, per row and step, whether
a block's self-attention and MLP are recomputed or their previous-step outputs reused.

A gate is a linear map of the module's time-modulated input (token mean) to a
skip probability; where it is over the row's `gate_threshold` (and the row is not
forced to compute), the module's output from the row's previous step is reused.
The gates are trained offline (lazydit_train.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..builtin.checkpoint import WEIGHTS_DIR, load_config, load_state, module_hash
from ..builtin.dit import DiT, DiTBlock, DiTInputs, modulate
from .block_cache import BlockCache, BlockPass
from .config import CacheConfigError

LAZYDIT_PATH = WEIGHTS_DIR / "lazydit.safetensors"


class LazyGates(nn.Module):
    def __init__(self, depth: int, hidden: int) -> None:
        super().__init__()
        self.attn = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(depth))
        self.mlp = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(depth))
        for g in [*self.attn, *self.mlp]:
            nn.init.zeros_(g.weight)
            nn.init.constant_(g.bias, -2.0)  # start by computing almost everything

    def skip_prob(self, kind: str, block: int, modulated: torch.Tensor) -> torch.Tensor:
        gate = (self.attn if kind == "attn" else self.mlp)[block]
        return torch.sigmoid(gate(modulated.mean(dim=1)))[:, 0]


def lazy_block(block: DiTBlock, gates: LazyGates, b: int, x: torch.Tensor, inp: DiTInputs,
               prev: tuple[torch.Tensor, torch.Tensor] | None, soft: bool = False,
               threshold: float | torch.Tensor = 0.5, allow: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One block whose attention / MLP outputs may be reused from the previous step.

    prev None: compute everything. soft: mix computed and previous outputs by the
    gate's skip probability (training). Otherwise reuse where the probability is
    over `threshold` and `allow` (rows not forced to compute) is set. Returns x,
    the module outputs to cache, and (2, B) skip probabilities or decisions.
    """
    sh1, sc1, g1, sh2, sc2, g2 = block.modulation(inp.c)
    m1 = modulate(block.norm1(x), sh1, sc1)
    a, p_attn = _module(block.attn, gates, "attn", b, m1, g1, prev and prev[0], soft,
                        threshold, allow)
    x = x + a
    x = x + block.cross(block.norm_x(x), inp.ctx, inp.ctx_mask)
    m2 = modulate(block.norm2(x), sh2, sc2)
    f, p_mlp = _module(block.mlp, gates, "mlp", b, m2, g2, prev and prev[1], soft,
                       threshold, allow)
    return x + f, (a, f), torch.stack([p_attn, p_mlp])


def _module(fn: nn.Module, gates: LazyGates, kind: str, b: int, m: torch.Tensor,
            g: torch.Tensor, prev: torch.Tensor | None, soft: bool,
            threshold: float | torch.Tensor, allow: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    p = gates.skip_prob(kind, b, m)
    if prev is None:
        return g[:, None] * fn(m), p
    if soft:
        mix = p[:, None, None]
        return (1 - mix) * (g[:, None] * fn(m)) + mix * prev, p
    skip = p > threshold
    if allow is not None:
        skip &= allow
    out = prev.clone()
    run = ~skip
    if bool(run.any()):
        out[run] = (g[run][:, None] * fn(m[run])).to(out.dtype)
    return out, skip.float()


def lazy_forward(dit: DiT, gates: LazyGates, h: torch.Tensor, inp: DiTInputs,
                 prev: list[tuple[torch.Tensor, torch.Tensor]] | None, soft: bool = False,
                 threshold: float | torch.Tensor = 0.5, allow: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Every block lazily: h, per-block module outputs, (depth, 2, B) skip probs/decisions."""
    outs, probs = [], []
    for b, block in enumerate(dit.blocks):
        h, mods, p = lazy_block(block, gates, b, h, inp, prev[b] if prev else None, soft,
                                threshold, allow)
        outs.append(mods)
        probs.append(p)
    return h, outs, torch.stack(probs)


def load_gates_for(dit: DiT, path: Path = LAZYDIT_PATH) -> LazyGates | None:
    """The shipped gates if they were trained for exactly these DiT weights."""
    if not path.is_file():
        return None
    meta = load_config(path)
    if meta.get("dit_hash") != module_hash(dit):
        return None
    cfg = meta["config"]
    return load_state(LazyGates(cfg["depth"], cfg["hidden"]), path).eval()




@dataclass(frozen=True)
class LazyDiTState:
    prev: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None  # (attn, mlp) per block
    skips_in_row: int = 0
    skipped_blocks: float = 0.0  # block-equivalents reused (attn + mlp halves)


@dataclass(frozen=True)
class LazyDiTConfig(BlockCache):
    policy: ClassVar[str] = "lazydit"
    requires: ClassVar[str | None] = "lazydit-gates"
    gate_threshold: float = 0.5  # reuse a module when its skip probability is over this

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.gate_threshold <= 1:
            raise CacheConfigError("gate_threshold", "gate_threshold must be in [0, 1]")

    def new_row_state(self) -> LazyDiTState:
        return LazyDiTState()

    @classmethod
    def before(cls, p: BlockPass, idx: list[int]) -> None:
        """Run these rows through every block with their gates (the shared block loop
        then skips them)."""
        if p.gates is None:
            raise ValueError("lazydit needs trained gates (models/builtin/weights/lazydit)")
        rows = [p.rows[i] for i in idx]
        assert all(r is not None for r in rows)
        sub = torch.tensor(idx)
        sub_inp = DiTInputs(p.inp.c[sub], p.inp.ctx[sub], p.inp.ctx_mask[sub])  # blocks only
        dev = p.h0.device
        allow = torch.tensor([not r.forced and r.state.prev is not None for r in rows],
                             device=dev)
        thresholds = torch.tensor([r.cfg.gate_threshold for r in rows], device=dev)
        prev = None
        if bool(allow.any()):
            zeros = torch.zeros_like(p.h0[sub][0])
            prev = [tuple(torch.stack([r.state.prev[b][k] if r.state.prev is not None
                                       else zeros for r in rows]) for k in range(2))
                    for b in range(p.depth)]
        h, outs, decisions = lazy_forward(p.dit, p.gates, p.h0[sub], sub_inp, prev,
                                          threshold=thresholds, allow=allow)
        if prev is None:
            decisions = torch.zeros_like(decisions)
        p.h[sub] = h
        for k, (i, r) in enumerate(zip(idx, rows)):
            reused = float(decisions[:, :, k].sum()) / 2  # attn + mlp = one block
            mine = tuple((a[k].clone(), f[k].clone()) for a, f in outs)  # not batch views
            p.new[i] = replace(r.state, prev=mine,
                               skips_in_row=r.state.skips_in_row + 1 if reused else 0,
                               skipped_blocks=r.state.skipped_blocks + reused)
            p.skip[i] = range(p.depth)
