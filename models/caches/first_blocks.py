"""first-blocks (FBCache / DBCache): always run the first n and last m blocks; after
the first n, compare their residual with the one from this row's last computed step
(relative L1); under the threshold, skip the middle blocks and add the middle
residual cached at that step."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .block_cache import BlockCache, BlockPass, rel_l1
from .config import CacheConfigError


@dataclass(frozen=True)
class FirstBlocksState:
    first_residual: torch.Tensor | None = None  # residual of the first n blocks
    middle_residual: torch.Tensor | None = None  # residual of the middle blocks
    skips_in_row: int = 0
    skipped_blocks: float = 0.0


@dataclass(frozen=True)
class FirstBlocksConfig(BlockCache):
    policy: ClassVar[str] = "first-blocks"
    block_threshold: float = 0.08  # relative L1 change of the first blocks' residual
    first_blocks: int = 1
    last_blocks: int = 0

    def validate(self) -> None:
        super().validate()
        if not self.block_threshold > 0:
            raise CacheConfigError("block_threshold", "block_threshold must be positive")
        if self.first_blocks < 1 or self.last_blocks < 0:
            raise CacheConfigError("first_blocks", "first_blocks must be >= 1, last_blocks >= 0")

    def new_row_state(self) -> FirstBlocksState:
        return FirstBlocksState()

    @classmethod
    def after_block(cls, p: BlockPass, b: int, idx: list[int]) -> None:
        for i in idx:
            row = p.rows[i]
            assert row is not None
            cfg, st = row.cfg, p.new[i]
            assert isinstance(cfg, FirstBlocksConfig)
            last_middle = p.depth - cfg.last_blocks - 1
            if b == cfg.first_blocks - 1:  # decide after the first n blocks
                res = p.h[i] - p.h0[i]
                if (not row.forced and st.first_residual is not None
                        and st.middle_residual is not None
                        and rel_l1(res, st.first_residual) < cfg.block_threshold):
                    p.skip[i] = range(cfg.first_blocks, last_middle + 1)
                    p.h[i] = p.h[i] + st.middle_residual
                    # keep the last computed step's residual as the reference (FBCache)
                    p.new[i] = replace(st, skips_in_row=st.skips_in_row + 1,
                                       skipped_blocks=st.skipped_blocks + len(p.skip[i]))
                else:
                    p.scratch[i] = p.h[i].clone()
                    p.new[i] = replace(st, first_residual=res.clone(), skips_in_row=0)
            if b == last_middle and i in p.scratch:
                p.new[i] = replace(p.new[i], middle_residual=(p.h[i] - p.scratch[i]).clone())
