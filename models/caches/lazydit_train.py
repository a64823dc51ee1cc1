"""Training LazyDiT gates (offline; `stepserve train-builtin --lazydit-only`).

The gates are trained with the base DiT frozen on pairs of consecutive steps of
real sampling runs: loss = MSE(full output, lazy output) + penalty * (fraction of
modules computed), with soft (probability-weighted) reuse during training and a
hard threshold when serving (lazydit.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..builtin.checkpoint import module_hash, save_module
from ..builtin.dit import DiT
from ..builtin.text import TextBatch
from ..builtin.yardstick import prompt_set
from ..sampling.state import init_state, step_batch
from .lazydit import LazyGates, lazy_forward


@dataclass
class GateTrainConfig:
    steps: int = 400
    batch: int = 32
    lr: float = 3e-3
    penalty: float = 0.02  # weight of the fraction of modules computed
    prompts: int = 96
    step_counts: tuple[int, ...] = (8, 16, 32)
    seed: int = 0


def trajectory_pairs(engine: Any, cfg: GateTrainConfig) -> list[tuple]:
    """(x_prev, t_prev, d_prev, x, t, d, text) for consecutive steps of real runs."""
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


def train_gates(dit: DiT, engine: Any, cfg: GateTrainConfig | None = None
                ) -> tuple[LazyGates, dict]:
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

