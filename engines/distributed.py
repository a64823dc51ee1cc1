"""One request across devices on torch.distributed (gloo on CPU, NCCL on GPUs):

- CFG parallel: the rows of one forward (a request's conditional and unconditional
  halves) are split over ranks and gathered back; every rank then takes the same
  sampler step, so all ranks hold the same state.
- Sequence parallel (Ulysses) for the built-in DiT: each rank keeps a slice of the
  image tokens; self-attention swaps to a split over heads with all-to-all, attends
  over the whole sequence, and swaps back. Text cross-attention, MLPs and adaLN are
  per token and need no communication. Both are exact (same maths per token/row).

The denoisers here are drop-in `Denoiser`s for models/sampling/state.py.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stepserve.models.builtin.dit import DiT, attention, modulate
from stepserve.models.builtin.text import TextBatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, port: int, backend: str = "gloo") -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(backend, rank=rank, world_size=world)


class CFGParallel:
    """Split one forward's rows (cond | uncond) over the ranks, gather the outputs."""

    def __init__(self, denoise: Callable[..., torch.Tensor]) -> None:
        self.denoise = denoise

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                 text: TextBatch) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        n = x.shape[0]
        per = -(-n // world)  # rows per rank, padded so every rank sends the same size
        lo, hi = min(n, rank * per), min(n, (rank + 1) * per)
        idx = list(range(lo, hi)) or [n - 1]  # an idle rank computes a dummy row
        out = self.denoise(x[idx], t[idx], d[idx], text.select(idx)).float()
        if out.shape[0] < per:
            out = torch.cat([out, out[-1:].expand(per - out.shape[0], *out.shape[1:])])
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.contiguous())
        return torch.cat(parts)[:n]


def _seq_to_heads(t: torch.Tensor, world: int) -> torch.Tensor:
    """(B, n_local, H, D) split by tokens -> (B, N, H/world, D) split by heads."""
    chunks = [c.contiguous() for c in t.chunk(world, dim=2)]
    out = [torch.empty_like(chunks[0]) for _ in range(world)]
    dist.all_to_all(out, chunks)
    return torch.cat(out, dim=1)


def _heads_to_seq(t: torch.Tensor, world: int) -> torch.Tensor:
    """(B, N, H/world, D) -> (B, n_local, H, D)."""
    chunks = [c.contiguous() for c in t.chunk(world, dim=1)]
    out = [torch.empty_like(chunks[0]) for _ in range(world)]
    dist.all_to_all(out, chunks)
    return torch.cat(out, dim=2)


def _ulysses_attention(attn: Any, x: torch.Tensor, world: int) -> torch.Tensor:
    b, n, c = x.shape
    h = attn.heads
    q = attn.q(x).view(b, n, h, -1)
    k, v = attn.kv(x).view(b, n, 2, h, -1).unbind(2)
    q, k, v = (_seq_to_heads(z, world).transpose(1, 2) for z in (q, k, v))
    y = attention(q, k, v).transpose(1, 2)  # (B, N, H/world, D)
    return attn.out(_heads_to_seq(y, world).reshape(b, n, c))


class SequenceParallel:
    """The built-in DiT with its image tokens split over the ranks (Ulysses)."""

    def __init__(self, dit: DiT) -> None:
        self.dit = dit

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                 text: TextBatch) -> torch.Tensor:
        dit, rank, world = self.dit, dist.get_rank(), dist.get_world_size()
        if dit.cfg.tokens % world or dit.cfg.heads % world:
            raise ValueError(f"{world} ranks must divide the DiT's tokens and heads")
        h, inp = dit.embed(x, t, d, text)
        n = h.shape[1] // world
        h = h[:, rank * n:(rank + 1) * n]
        for blk in dit.blocks:
            sh1, sc1, g1, sh2, sc2, g2 = blk.modulation(inp.c)
            h = h + g1[:, None] * _ulysses_attention(blk.attn,
                                                     modulate(blk.norm1(h), sh1, sc1), world)
            h = h + blk.cross(blk.norm_x(h), inp.ctx, inp.ctx_mask)
            h = h + g2[:, None] * blk.mlp(modulate(blk.norm2(h), sh2, sc2))
        local = dit.patch_head(h, inp).contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        return dit.finish(torch.cat(parts, dim=1), inp)


def _entry(rank: int, world: int, port: int, threads: int, fn: Callable, args: tuple,
           results: Any) -> None:
    torch.set_num_threads(threads)
    init(rank, world, port)
    try:
        out = fn(*args)
        if rank == 0:  # plain arrays: torch's shared-memory tensors die with this process
            results.put({k: v.numpy() if torch.is_tensor(v) else v for k, v in out.items()}
                        if isinstance(out, dict) else out)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int = 2, args: tuple = (), threads: int = 1) -> Any:
    """Run fn(*args) on `world` CPU processes (gloo); returns rank 0's result.
    fn must be importable (a module-level function)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, threads, fn, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    out = results.get()
    if isinstance(out, dict):
        out = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
               for k, v in out.items()}
    return out
