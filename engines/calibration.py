"""Timestep-aware calibration data: denoiser inputs recorded along real sampling runs.

Activation ranges in a diffusion denoiser shift strongly with the timestep
(PTQ4DM / Q-Diffusion), so calibrating on random inputs or one timestep
mis-sizes the int8 ranges. Here a reference engine samples a handful of
prompts at several step counts and every forward's inputs are kept, so all
steps and step sizes the server will see are covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from stepserve.models.builtin.text import TextBatch
from stepserve.models.builtin.yardstick import prompt_set
from stepserve.models.sampling.state import init_state, run_to_completion

from .base import Engine
from .onnx_export import feeds

CALIBRATION_SEED = 7  # not the yardstick's evaluation seed: calibration never sees eval prompts


@dataclass(frozen=True)
class CalibrationConfig:
    prompts: int = 8
    steps: tuple[int, ...] = (1, 2, 4, 8)
    seed: int = CALIBRATION_SEED

    def key(self) -> dict:
        return {"prompts": self.prompts, "steps": list(self.steps), "seed": self.seed}


DEFAULT_CALIBRATION = CalibrationConfig()


def calibration_prompts(n: int, seed: int = CALIBRATION_SEED) -> list[str]:
    return list(prompt_set("seen", n, seed=seed).prompts)


def trajectory_inputs(engine: Engine, cfg: CalibrationConfig = DEFAULT_CALIBRATION
                      ) -> list[dict[str, np.ndarray]]:
    """One feed dict per denoiser forward of real sampling runs (all steps, all counts)."""
    prompts = calibration_prompts(cfg.prompts, cfg.seed)
    info = engine.info
    cond = engine.encode(prompts)
    uncond = engine.encode([""])
    recorded: list[dict[str, np.ndarray]] = []

    def recording(x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                  text: TextBatch) -> torch.Tensor:
        recorded.append(feeds(x, t, d, text))
        return engine.denoise(x, t, d, text)

    for steps in tqdm(cfg.steps, desc="calibration trajectories", unit="step count"):
        states = [init_state(cfg.seed * 1000 + 10 * steps + i, steps, cond.select([i]), uncond,
                             shape=info.image_shape, guidance=info.default_guidance,
                             time_shift=info.time_shift) for i in range(len(prompts))]
        run_to_completion(recording, states, max_batch=len(prompts))
    return recorded


def split_rows(batches: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Batch feeds -> one feed per sample (static calibration sees single rows)."""
    rows = []
    for feed in batches:
        for i in range(len(feed["x"])):
            rows.append({k: v[i:i + 1] for k, v in feed.items()})
    return rows
