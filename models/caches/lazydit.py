"""LazyDiT: learned per-block gates that decide, per row and step, whether a block's
self-attention and MLP are recomputed or their previous-step outputs reused.

A gate is a linear map of the module's time-modulated input (token mean) to a
skip probability. The gates are trained with the base DiT frozen on pairs of
consecutive steps of real sampling runs: loss = MSE(full output, lazy output)
+ penalty * (fraction of modules computed), with soft (probability-weighted)
reuse during training and a hard threshold when serving.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..builtin.checkpoint import (
    WEIGHTS_DIR,
    load_config,
    load_state,
    module_hash,
    save_module,
)
from ..builtin.dit import DiT, DiTBlock, DiTInputs, modulate

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


@dataclass
class GateTrainConfig:
    steps: int = 400
    batch: int = 32
    lr: float = 3e-3
    penalty: float = 0.02  # weight of the fraction of modules computed
    prompts: int = 96
    step_counts: tuple[int, ...] = (8, 16, 32)
    seed: int = 0


def trajectory_pairs(engine, cfg: GateTrainConfig) -> list[tuple]:
    """(x_prev, t_prev, d_prev, x, t, d, text) for consecutive steps of real runs."""
    from ..builtin.yardstick import prompt_set
    from ..sampling.state import init_state, step_batch

    ps = prompt_set("seen", cfg.prompts, seed=cfg.seed + 11)
    cond, uncond = engine.encode(list(ps.prompts)), engine.encode([""])
    pairs = []
    for steps in cfg.step_counts:
        states = [init_state(cfg.seed * 7919 + i, steps, cond.select([i]), uncond,
                             shape=engine.info.image_shape, time_shift=engine.info.time_shift)
                  for i in range(len(ps.prompts))]
        prev = None
        while not states[0].done:
            cur = [(s.x, s.t, s.d) for s in states]
            if prev is not None:
                pairs += [(*p, *c, i) for i, (p, c) in enumerate(zip(prev, cur))]
            prev = cur
            states = step_batch(engine.denoise, states)
    return [(*p[:6], cond.select([p[6]])) for p in pairs]


def train_gates(dit: DiT, engine, cfg: GateTrainConfig | None = None
                ) -> tuple[LazyGates, dict]:
    from ..builtin.text import TextBatch

    cfg = cfg or GateTrainConfig()

    for p in dit.parameters():
        p.requires_grad_(False)
    gates = LazyGates(len(dit.blocks), dit.cfg.hidden)
    opt = torch.optim.Adam(gates.parameters(), lr=cfg.lr)
    pairs = trajectory_pairs(engine, cfg)
    rng = np.random.default_rng(cfg.seed)
    start, log = time.perf_counter(), []
    for step in tqdm(range(cfg.steps), desc="LazyDiT gates"):
        batch = [pairs[i] for i in rng.integers(len(pairs), size=cfg.batch)]
        xp, tp, dp, x, t, d = (torch.stack([torch.as_tensor(b[k]) for b in batch]).float()
                               for k in range(6))
        text = TextBatch.cat([b[6] for b in batch])
        with torch.no_grad():
            hp, inp_p = dit.embed(xp, tp, dp, text)
            _, prev, _ = lazy_forward(dit, gates, hp, inp_p, None)
            target = dit(x, t, d, text)
        h, inp = dit.embed(x, t, d, text)
        h, _, probs = lazy_forward(dit, gates, h, inp, prev, soft=True)
        out = dit.head(h, inp)
        mse = torch.mean((out - target) ** 2) / torch.mean(target ** 2)
        computed = 1 - probs.mean()
        loss = mse + cfg.penalty * computed
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log.append({"step": step, "rel_mse": float(mse.detach()),
                        "computed": float(computed.detach())})
    return gates.eval(), {"train_seconds": round(time.perf_counter() - start),
                          "pairs": len(pairs), "log": log}


def save_gates(gates: LazyGates, dit: DiT, path: Path, meta: dict) -> None:
    save_module(gates, path, {"depth": len(gates.attn), "hidden": gates.attn[0].in_features},
                {"dit_hash": module_hash(dit), **meta})

