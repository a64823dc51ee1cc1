"""Forward-level caches for the built-in DiT, per batch row, as hooks on one forward.

The forward embeds the batch once, then runs block by block on the rows that need
each block; a row's cache policy (first-blocks, TeaCache, LazyDiT: each in its own
module) hooks in before the blocks, after each block and after the blocks, and may
mark a range of blocks its row skips. Rows of one batch decide independently, so
requests with and without caches share one forward. (diffusers' hooks keep one
trajectory per module, which is why this is ours.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..builtin.dit import DiT, DiTInputs
from ..builtin.text import TextBatch
from ..lora import apply as lora
from .config import CacheConfigError, ForwardCache


@dataclass(frozen=True)
class BlockCache(ForwardCache):
    """Base of the DiT block policies: every one forces its first `warmup` steps and the
    last step, and never skips more than `max_skips` steps in a row."""

    requires: ClassVar[str | None] = "dit-blocks"
    warmup: int = 1
    max_skips: int = 3

    def validate(self) -> None:
        if self.warmup < 1:
            raise CacheConfigError("warmup", "warmup must be at least 1 (step 0 is computed)")
        if self.max_skips < 1:
            raise CacheConfigError("max_skips", "max_skips must be at least 1")

    @classmethod
    def before(cls, p: BlockPass, idx: list[int]) -> None:
        """Before the first block, for this policy's rows `idx`."""

    @classmethod
    def after_block(cls, p: BlockPass, b: int, idx: list[int]) -> None:
        """After block `b` ran (on the rows that did not skip it)."""

    @classmethod
    def after(cls, p: BlockPass, idx: list[int]) -> None:
        """After the last block, before the head."""


@dataclass(frozen=True)
class RowCache:
    """One row's policy, its state, and where its request is."""

    cfg: BlockCache
    state: Any
    step: int
    steps: int

    @property
    def forced(self) -> bool:
        return (self.step < self.cfg.warmup or self.step == self.steps - 1
                or self.state.skips_in_row >= self.cfg.max_skips)


@dataclass
class BlockPass:
    """The working set of one cached forward, shared by the policies' hooks."""

    dit: DiT
    h: torch.Tensor  # (rows, tokens, hidden): the rows' hidden states, updated in place
    h0: torch.Tensor  # the embedded input (never written)
    inp: DiTInputs
    rows: list[RowCache | None]
    new: list[Any]  # each row's state after this forward
    gates: Any = None  # LazyGates for these weights, if any
    skip: dict[int, range] = field(default_factory=dict)  # row -> blocks it does not run
    scratch: dict[int, torch.Tensor] = field(default_factory=dict)  # a policy's per-row memo

    @property
    def depth(self) -> int:
        return len(self.dit.blocks)

    def runs(self, row: int, block: int) -> bool:
        return block not in self.skip.get(row, ())


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / (b.abs().mean() + 1e-12))


@torch.inference_mode()
def cached_forward(dit: DiT, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                   text: TextBatch, rows: list[RowCache | None], gates: Any = None
                   ) -> tuple[torch.Tensor, list[Any]]:
    """The DiT forward with per-row block caches; rows[i] None means no cache. Returns
    the output and each row's new state (None for rows without a cache)."""
    h0, inp = dit.embed(x, t, d, text)
    p = BlockPass(dit, h0.clone(), h0, inp, rows, [r.state if r else None for r in rows],
                  gates)
    groups: dict[type[BlockCache], list[int]] = {}
    for i, r in enumerate(rows):
        if r is not None:
            groups.setdefault(type(r.cfg), []).append(i)
    for policy, idx in groups.items():
        policy.before(p, idx)
    for b, block in enumerate(dit.blocks):
        run = [i for i in range(len(rows)) if p.runs(i, b)]
        if run:
            sel = torch.tensor(run)
            with lora.subset(run):
                p.h[sel] = block(p.h[sel], inp.c[sel], inp.ctx[sel], inp.ctx_mask[sel]
                                 ).to(p.h.dtype)
        for policy, idx in groups.items():
            policy.after_block(p, b, idx)
    for policy, idx in groups.items():
        policy.after(p, idx)
    return dit.head(p.h, inp), p.new
