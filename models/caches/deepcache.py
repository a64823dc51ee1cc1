"""DeepCache for U-Nets: on cached steps recompute only the shallow path (conv_in, the
first down block, the last up block) and reuse the deep features (the input of the
last up block) from the row's last full step.

Rows of one batch decide independently: the deep blocks run on the subset of rows
that need a full step, so requests with and without the cache share one forward.
Written against diffusers' UNet2DConditionModel (its forward, minus the adapter
and ControlNet residuals stepserve does not use); the library's own caches hook
one trajectory per module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..lora import apply as lora
from .config import CacheConfigError, ForwardCache


@dataclass(frozen=True)
class DeepState:
    """One row's deep features from its last full step."""

    features: torch.Tensor | None = None
    skipped_blocks: float = 0.0


@dataclass(frozen=True)
class DeepCacheConfig(ForwardCache):
    """A full U-Net step every `interval` steps after `warmup`, and at the last step."""

    policy: ClassVar[str] = "deepcache"
    requires: ClassVar[str | None] = "unet"
    interval: int = 2
    warmup: int = 1

    def validate(self) -> None:
        if self.interval < 1:
            raise CacheConfigError("interval", "interval must be at least 1")
        if self.warmup < 1:
            raise CacheConfigError("warmup", "warmup must be at least 1 (step 0 is computed)")

    def new_row_state(self) -> DeepState:
        return DeepState()

    def reuses(self, state: DeepState, step: int, steps: int) -> bool:
        return should_reuse(step, steps, self.interval, self.warmup,
                            state.features is not None)


def _block(block: Any, sample: torch.Tensor, emb: torch.Tensor, ehs: torch.Tensor | None,
           **kwargs: Any) -> Any:
    # probed: diffusers sets has_cross_attention only on its cross-attention blocks
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs, **kwargs)
    return block(hidden_states=sample, temb=emb, **kwargs)


def _deep(unet: Any, s: torch.Tensor, e: torch.Tensor, h: torch.Tensor,
          down_res: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The deep path (down blocks after the first, mid, up blocks but the last)."""
    for block in unet.down_blocks[1:]:
        s, r = _block(block, s, e, h)
        down_res += r
    if unet.mid_block is not None:
        s = (unet.mid_block(s, e, encoder_hidden_states=h)
             if getattr(unet.mid_block, "has_cross_attention", False)  # as above
             else unet.mid_block(s, e))
    for block in unet.up_blocks[:-1]:
        k = len(block.resnets)
        s = _block(block, s, e, h, res_hidden_states_tuple=down_res[-k:],
                   upsample_size=None)
        down_res = down_res[:-k]
    return s


def deepcache_forward(unet: Any, x: torch.Tensor, t: torch.Tensor, *,
                      encoder_hidden_states: torch.Tensor,
                      added_cond_kwargs: dict | None = None,
                      timestep_cond: torch.Tensor | None = None,
                      reuse: torch.Tensor | None = None,
                      cached: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(model output, deep features) for a batch; rows with reuse[i] take cached[i] as
    their deep features instead of running the deep blocks."""
    n = x.shape[0]
    reuse = torch.zeros(n, dtype=torch.bool) if reuse is None else reuse.cpu()
    t_emb = unet.get_time_embed(sample=x, timestep=t)
    emb = unet.time_embedding(t_emb, timestep_cond)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added_cond_kwargs or {})
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                             added_cond_kwargs=added_cond_kwargs or {})
    sample = unet.conv_in(x)
    res: tuple[torch.Tensor, ...] = (sample,)
    sample, first = _block(unet.down_blocks[0], sample, emb, ehs)
    res += first
    last = unet.up_blocks[-1]
    shallow_res, deep_res = res[:len(last.resnets)], res[len(last.resnets):]
    full = (~reuse).nonzero().flatten().tolist()
    deep = None
    if full:
        idx = torch.tensor(full, device=x.device)
        with lora.subset(full):
            deep = _deep(unet, sample[idx], emb[idx], ehs[idx],
                         tuple(r[idx] for r in deep_res))
    if deep is not None:
        features = torch.empty((n, *deep.shape[1:]), dtype=deep.dtype, device=deep.device)
        features[torch.tensor(full, device=x.device)] = deep
    else:
        assert cached is not None, "every row reuses: their features must be given"
        features = torch.empty_like(cached)
    if bool(reuse.any()):
        assert cached is not None
        rows = reuse.nonzero().flatten().to(x.device)
        features[rows] = cached[rows].to(features)
    out = _block(last, features, emb, ehs, res_hidden_states_tuple=shallow_res,
                 upsample_size=None)
    if unet.conv_norm_out is not None:
        out = unet.conv_act(unet.conv_norm_out(out))
    return unet.conv_out(out), features


def should_reuse(step: int, steps: int, interval: int, warmup: int, have: bool) -> bool:
    """Reuse deep features unless warming up, at the last step, without a cache, or at a
    full step (every `interval` steps)."""
    if not have or step < warmup or step == steps - 1:
        return False
    return (step - warmup) % interval != 0
