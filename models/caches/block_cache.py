"""Block caches for DiTs, per request row: first-blocks residual test and TeaCache.

- first-blocks (FBCache / DBCache): always run the first n and last m blocks;
  after the first n, compare their residual with the one from this row's
  last computed step (relative L1); under the threshold, skip the middle
  blocks and add the middle residual cached at that step.
- lazydit: learned gates per block (lazydit.py) decide per row whether
  attention and MLP are recomputed or reused from the row's previous step.
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

from ..builtin.dit import DiT, DiTInputs, modulate
from ..builtin.text import TextBatch
from .config import CacheConfig
from .lazydit import LazyGates, lazy_forward


@dataclass(frozen=True)
class BlockState:
    """One row's (request image, cond or uncond) block-cache memory."""

    first_residual: torch.Tensor | None = None  # first-blocks: residual of the first n
    middle_residual: torch.Tensor | None = None  # first-blocks: residual of the middle
    prev_modulated: torch.Tensor | None = None  # teacache: block 0's modulated input
    stack_residual: torch.Tensor | None = None  # teacache: residual of all blocks
    accumulated: float = 0.0
    skips_in_row: int = 0
    skipped_blocks: float = 0.0  # block-equivalents reused (lazydit: attn + mlp halves)
    lazy_prev: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None  # lazydit


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
                   text: TextBatch, rows: list[RowCache | None],
                   gates: LazyGates | None = None
                   ) -> tuple[torch.Tensor, list[BlockState | None]]:
    """The DiT forward with per-row block caches; rows[i] None means no cache."""
    h, inp = dit.embed(x, t, d, text)
    h0 = h
    depth = len(dit.blocks)
    new: list[BlockState | None] = [r.state if r else None for r in rows]
    lazy = [i for i, r in enumerate(rows) if r and r.cfg.policy == "lazydit"]
    if lazy:
        if gates is None:
            raise ValueError("lazydit needs trained gates (models/builtin/weights/lazydit)")
        h = h.clone()
        h[lazy] = _lazy_rows(dit, gates, h0, inp, [rows[i] for i in lazy], lazy, new)
    skip_stack: set[int] = set(lazy)  # lazy rows have run their blocks already
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
                new[i] = replace(st, prev_modulated=mod[k].clone(), accumulated=acc,
                                 skips_in_row=st.skips_in_row + 1,
                                 skipped_blocks=st.skipped_blocks + depth)
            else:
                new[i] = replace(st, prev_modulated=mod[k].clone(), accumulated=0.0,
                                 skips_in_row=0)
    active = [i for i in range(len(rows)) if i not in skip_stack]
    fb = {i: rows[i].cfg for i in active if rows[i] and rows[i].cfg.policy == "first-blocks"}
    skip_middle: set[int] = set()
    before_middle: dict[int, torch.Tensor] = {}
    h = h.clone() if not lazy else h
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
                    # keep the last computed step's residual as the reference (FBCache)
                    new[i] = replace(st, skips_in_row=st.skips_in_row + 1,
                                     skipped_blocks=st.skipped_blocks + n_mid)
                else:
                    before_middle[i] = h[i].clone()
                    new[i] = replace(st, first_residual=res.clone(), skips_in_row=0)
            if b == depth - cfg.last_blocks - 1 and i in before_middle:
                new[i] = replace(new[i], middle_residual=(h[i] - before_middle[i]).clone())
    for i in skip_stack - set(lazy):
        h[i] = h0[i] + rows[i].state.stack_residual
    for i in tea:
        if i not in skip_stack:
            new[i] = replace(new[i], stack_residual=(h[i] - h0[i]).clone())
    return dit.head(h, inp), new


def _lazy_rows(dit: DiT, gates: LazyGates, h0: torch.Tensor, inp: DiTInputs,
               rows: list[RowCache], index: list[int], new: list[BlockState | None]
               ) -> torch.Tensor:
    """Run the lazydit rows through every block with their gates; update their states."""
    sub = torch.tensor(index)
    sub_inp = DiTInputs(inp.c[sub], inp.ctx[sub], inp.ctx_mask[sub])
    allow = torch.tensor([not r.forced and r.state.lazy_prev is not None for r in rows],
                         device=h0.device)
    thresholds = torch.tensor([r.cfg.gate_threshold for r in rows], device=h0.device)
    prev = None
    if bool(allow.any()):
        zeros = torch.zeros_like(h0[sub][0])
        prev = [tuple(torch.stack([r.state.lazy_prev[b][k] if r.state.lazy_prev is not None
                                   else zeros for r in rows]) for k in range(2))
                for b in range(len(dit.blocks))]
    h, outs, decisions = lazy_forward(dit, gates, h0[sub], sub_inp, prev,
                                      threshold=thresholds, allow=allow)
    if prev is None:
        decisions = torch.zeros_like(decisions)
    for k, (i, r) in enumerate(zip(index, rows)):
        reused = float(decisions[:, :, k].sum()) / 2  # attn + mlp = one block
        mine = tuple((a[k].clone(), f[k].clone()) for a, f in outs)  # not views of the batch
        new[i] = replace(r.state, lazy_prev=mine,
                         skips_in_row=r.state.skips_in_row + 1 if reused else 0,
                         skipped_blocks=r.state.skipped_blocks + reused)
    return h


def _middle(cfg: CacheConfig, b: int, depth: int) -> bool:
    return cfg.first_blocks <= b < depth - cfg.last_blocks
