"""Context (sequence) parallelism for diffusers transformers, through diffusers' own
`ContextParallelConfig` and `enable_parallelism` (Ulysses or ring attention).

It applies to the transformers for which diffusers ships a context-parallel plan
(`_cp_plan`: FLUX among them). Every rank passes the full, identical inputs;
diffusers' hooks split the sequence over the ranks and gather the output, so every
rank ends with the whole result. The built-in DiT has its own Ulysses
implementation (distributed.SequenceParallel); other diffusers transformers (SD3,
PixArt) have no plan, and CFG parallel is the way to spread them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def supports(model: Any) -> bool:
    return model._cp_plan is not None  # diffusers models that ship a plan set it


@contextlib.contextmanager
def _cpu_device_count() -> Iterator[None]:
    """diffusers places ranks with `rank % torch.accelerator.device_count()`, which is
    a division by zero on a CPU-only machine (gloo): count the CPU as one device while
    the model is set up."""
    original = torch.accelerator.device_count
    if original() == 0:
        torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def _waited(value: Any) -> Any:
    """diffusers returns the gathered output as an AsyncCollectiveTensor: wait for it here
    so callers get a plain tensor (and no collective is left unwaited)."""
    from diffusers.utils import BaseOutput
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    if isinstance(value, AsyncCollectiveTensor):
        return value.wait()
    if isinstance(value, tuple):
        return tuple(_waited(v) for v in value)
    if isinstance(value, BaseOutput) and "sample" in value:
        value.sample = _waited(value.sample)
    return value


def enable(model: Any, ulysses: int = 1, ring: int = 1) -> Any:
    """Spread `model`'s attention over the torch.distributed ranks (already initialised):
    `ulysses` ranks split heads after an all-to-all, `ring` ranks pass K/V around."""
    from diffusers import ContextParallelConfig

    name = type(model).__name__
    if not supports(model):
        raise ValueError(f"{name}: diffusers has no context-parallel plan for it; use CFG "
                         "parallel (engines/distributed.CFGParallel) instead")
    if ulysses * ring != torch.distributed.get_world_size():
        raise ValueError(f"ulysses x ring = {ulysses * ring} must equal the world size "
                         f"({torch.distributed.get_world_size()})")
    if ring > 1 and next(model.parameters()).device.type == "cpu":
        raise ValueError("ring attention needs an attention backend that returns the "
                         "log-sum-exp (a GPU one); use ulysses on CPUs")
    heads = model.config.get("num_attention_heads", ulysses)  # a config dict
    if heads % ulysses:
        raise ValueError(f"{name} has {heads} attention heads: not divisible by "
                         f"ulysses={ulysses}")
    config = ContextParallelConfig(ulysses_degree=ulysses if ulysses > 1 else None,
                                   ring_degree=ring if ring > 1 else None)
    with _cpu_device_count():
        model.enable_parallelism(config=config)
    model.register_forward_hook(lambda _m, _args, out: _waited(out))
    return model
