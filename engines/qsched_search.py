"""Search the Q-Sched start pair (c_m, c_s) for a quantized engine.

Reference-free objective on ~25 calibration prompts (never the evaluation
prompts): soft prompt agreement from the yardstick's classifier minus a
palette-distance image-quality term. The grid includes (1, 1), so the chosen
pair never scores worse than no correction on the calibration set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from stepserve.models.builtin.yardstick import Yardstick, palette_error, prompt_set
from stepserve.models.sampling.qsched import QSched
from stepserve.models.sampling.state import init_state

from .calibration import CALIBRATION_SEED
from .flow_sampling import FlowSampling

GRID = tuple(round(0.8 + 0.05 * i, 2) for i in range(9))  # 0.80 .. 1.20


@dataclass(frozen=True)
class QSchedResult:
    best: QSched
    score: float
    identity_score: float
    table: list[tuple[float, float, float, float, float]]  # c_m, c_s, agree, palette, score


def generate_with(engine: FlowSampling, qsched: QSched, prompts: list[str], seeds: list[int],
                  steps: int) -> np.ndarray:
    """The engine's images with this Q-Sched pair (the engine's own pair is not used)."""
    text = engine.encode([*prompts, ""])
    uncond = text.select([len(prompts)])
    info = engine.info
    states = [init_state(seed, steps, text.select([i]), uncond, shape=info.image_shape,
                         guidance=info.default_guidance, time_shift=info.time_shift,
                         qsched=qsched) for i, seed in enumerate(seeds)]
    while not states[0].done:  # equal step counts: the batch finishes together
        states = engine.step_batch(states)
    return engine.decode(torch.stack([s.x for s in states]))


def score(engine: FlowSampling, qsched: QSched, prompts: list[str], labels: np.ndarray,
          seeds: list[int], steps: int, yardstick: Yardstick,
          quality_weight: float) -> tuple[float, float, float]:
    images = generate_with(engine, qsched, prompts, seeds, steps)
    agree = yardstick.agreement(images, labels)
    quality = palette_error(images)
    return agree, quality, agree - quality_weight * quality


def search_qsched(engine: FlowSampling, prompts: int = 25, steps: int = 4,
                  grid: tuple[float, ...] = GRID, quality_weight: float = 1.0,
                  yardstick: Yardstick | None = None) -> QSchedResult:
    yardstick = yardstick or Yardstick()
    ps = prompt_set("seen", prompts, seed=CALIBRATION_SEED + 1)
    labels = ps.labels
    seeds = [CALIBRATION_SEED * 1000 + i for i in range(prompts)]
    table = []
    for c_m in tqdm(grid, desc="Q-Sched search", unit="c_m"):
        for c_s in grid:
            agree, quality, total = score(engine, QSched(c_m, c_s), list(ps.prompts), labels,
                                          seeds, steps, yardstick, quality_weight)
            table.append((c_m, c_s, agree, quality, total))
    best = max(table, key=lambda row: row[4])
    identity = next(row[4] for row in table if row[0] == 1.0 and row[1] == 1.0)
    return QSchedResult(QSched(best[0], best[1]), best[4], identity, table)
