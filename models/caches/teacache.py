"""TeaCache: accumulate the relative L1 change of block 0's time-modulated input
across steps; while the sum stays under the threshold, skip the whole block stack and
add its cached residual; a computed step resets the sum."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..builtin.dit import modulate
from .block_cache import BlockCache, BlockPass, rel_l1
from .config import CacheConfigError


@dataclass(frozen=True)
class TeaCacheState:
    prev_modulated: torch.Tensor | None = None  # block 0's modulated input, last step
    stack_residual: torch.Tensor | None = None  # residual of all blocks, last computed step
    accumulated: float = 0.0
    skips_in_row: int = 0
    skipped_blocks: float = 0.0


@dataclass(frozen=True)
class TeaCacheConfig(BlockCache):
    policy: ClassVar[str] = "teacache"
    block_threshold: float = 0.08  # most accumulated relative L1 change to skip at

    def validate(self) -> None:
        super().validate()
        if not self.block_threshold > 0:
            raise CacheConfigError("block_threshold", "block_threshold must be positive")

    def new_row_state(self) -> TeaCacheState:
        return TeaCacheState()

    @classmethod
    def before(cls, p: BlockPass, idx: list[int]) -> None:
        """Decide from block 0's modulation of the embedded input alone."""
        blk = p.dit.blocks[0]
        sh, sc = blk.modulation(p.inp.c[idx])[:2]
        mod = modulate(blk.norm1(p.h0[idx]), sh, sc)
        for k, i in enumerate(idx):
            row = p.rows[i]
            assert row is not None and isinstance(row.cfg, TeaCacheConfig)
            st = row.state
            acc = st.accumulated
            if st.prev_modulated is not None:
                acc += rel_l1(mod[k], st.prev_modulated)
            if (not row.forced and st.stack_residual is not None
                    and acc < row.cfg.block_threshold):
                p.skip[i] = range(p.depth)
                p.new[i] = replace(st, prev_modulated=mod[k].clone(), accumulated=acc,
                                   skips_in_row=st.skips_in_row + 1,
                                   skipped_blocks=st.skipped_blocks + p.depth)
            else:
                p.new[i] = replace(st, prev_modulated=mod[k].clone(), accumulated=0.0,
                                   skips_in_row=0)

    @classmethod
    def after(cls, p: BlockPass, idx: list[int]) -> None:
        for i in idx:
            row = p.rows[i]
            assert row is not None
            if i in p.skip:
                p.h[i] = p.h0[i] + row.state.stack_residual
            else:
                p.new[i] = replace(p.new[i], stack_residual=(p.h[i] - p.h0[i]).clone())
