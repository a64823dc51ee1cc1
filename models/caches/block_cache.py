"""Block caches for DiTs, per request row: first-blocks residual test and TeaCache.

- first-blocks (FBCache / DBCache): always run the first n and last m blocks;
  after the first n, compare their residual with the one from this row's
  previous step (relative L1); under the threshold, skip the middle blocks
  and add the middle residual cached at the last full step.
- teacache: accumulate the relative L1 change of block 0's time-modulated
  input across steps; while the sum stays under the threshold, skip the whole
  block stack and add its cached residual; a computed step resets the sum.

Both force the first `warmup` steps and the last step, and cap consecutive
skips. Rows of one batch decide independently: a block runs on the subset of
rows that need it, so requests with and without caches share one forward.
diffusers' hooks keep one trajectory per module, which is why this is ours.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..builtin.dit import DiT, modulate
from ..builtin.text import TextBatch
from .config import CacheConfig


@dataclass(frozen=True)
class BlockState:
    """One row's (request image, cond or uncond) block-cache memory."""

    first_residual: torch.Tensor | None = None  # first-blocks: residual of the first n
    middle_residual: torch.Tensor | None = None  # first-blocks: residual of the middle
    prev_modulated: torch.Tensor | None = None  # teacache: block 0's modulated input
    stack_residual: torch.Tensor | None = None  # teacache: residual of all blocks
    accumulated: float = 0.0
    skips_in_row: int = 0
    skipped_blocks: int = 0


@dataclass(frozen=True)
class RowCache:
    cfg: CacheConfig
    state: BlockState
    step: int
    steps: int

    @property
    def forced(self) -> bool:
        return (self.step < self.cfg.warmup or self.step == self.steps - 1
                or self.state.skips_in_row >= self.cfg.max_skips)


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / (b.abs().mean() + 1e-12))


@torch.inference_mode()
def cached_forward(dit: DiT, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                   text: TextBatch, rows: list[RowCache | None]
                   ) -> tuple[torch.Tensor, list[BlockState | None]]:
    """The DiT forward with per-row block caches; rows[i] None means no cache."""
    h, inp = dit.embed(x, t, d, text)
    h0 = h
    depth = len(dit.blocks)
    new: list[BlockState | None] = [r.state if r else None for r in rows]
    skip_stack: set[int] = set()
    # teacache decisions need only block 0's modulation of the embedded input
    tea = [i for i, r in enumerate(rows) if r and r.cfg.policy == "teacache"]
    if tea:
        blk = dit.blocks[0]
        sh, sc = blk.modulation(inp.c[tea])[:2]
        mod = modulate(blk.norm1(h[tea]), sh, sc)
        for k, i in enumerate(tea):
            r, st = rows[i], rows[i].state
            acc = st.accumulated
            if st.prev_modulated is not None:
                acc += _rel_l1(mod[k], st.prev_modulated)
            if (not r.forced and st.stack_residual is not None
                    and acc < r.cfg.block_threshold):
                skip_stack.add(i)
                new[i] = replace(st, prev_modulated=mod[k], accumulated=acc,
                                 skips_in_row=st.skips_in_row + 1,
                                 skipped_blocks=st.skipped_blocks + depth)
            else:
                new[i] = replace(st, prev_modulated=mod[k], accumulated=0.0, skips_in_row=0)
    active = [i for i in range(len(rows)) if i not in skip_stack]
    fb = {i: rows[i].cfg for i in active if rows[i] and rows[i].cfg.policy == "first-blocks"}
    skip_middle: set[int] = set()
    before_middle: dict[int, torch.Tensor] = {}
    h = h.clone()
    for b, block in enumerate(dit.blocks):
        run = [i for i in active if not (i in skip_middle and _middle(fb[i], b, depth))]
        if run:
            idx = torch.tensor(run)
            h[idx] = block(h[idx], inp.c[idx], inp.ctx[idx], inp.ctx_mask[idx]).to(h.dtype)
        for i, cfg in fb.items():
            st = new[i]
            if b == cfg.first_blocks - 1:  # decide after the first n blocks
                res = h[i] - h0[i]
                r = rows[i]
                if (not r.forced and st.first_residual is not None
                        and st.middle_residual is not None
                        and _rel_l1(res, st.first_residual) < cfg.block_threshold):
                    skip_middle.add(i)
                    h[i] = h[i] + st.middle_residual
                    n_mid = depth - cfg.first_blocks - cfg.last_blocks
                    new[i] = replace(st, first_residual=res,
                                     skips_in_row=st.skips_in_row + 1,
                                     skipped_blocks=st.skipped_blocks + n_mid)
                else:
                    before_middle[i] = h[i].clone()
                    new[i] = replace(st, first_residual=res, skips_in_row=0)
            if b == depth - cfg.last_blocks - 1 and i in before_middle:
                new[i] = replace(new[i], middle_residual=h[i] - before_middle[i])
    for i in skip_stack:
        h[i] = h0[i] + rows[i].state.stack_residual
    for i in tea:
        if i not in skip_stack:
            new[i] = replace(new[i], stack_residual=h[i] - h0[i])
    return dit.head(h, inp), new


def _middle(cfg: CacheConfig, b: int, depth: int) -> bool:
    return cfg.first_blocks <= b < depth - cfg.last_blocks
