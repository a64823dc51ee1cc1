"""A fake engine: the scheduler's tests need no model."""

from __future__ import annotations

import numpy as np
import torch

from stepserve.engines.base import EngineInfo
from stepserve.engines.flow_sampling import FlowSampling
from stepserve.models.builtin.text import TextBatch

BOOM = "boom"  # a prompt containing this makes the forward raise


class FakeEngine(FlowSampling):
    def __init__(self, shape: tuple[int, int, int] = (3, 4, 4)) -> None:
        self.info = EngineInfo(engine="fake", model="fake", precision="fp32", device="cpu",
                               image_shape=shape, time_shift=1.0, default_steps=4,
                               default_guidance=1.0)
        self.batches: list[int] = []  # rows per forward
        self.encoded: list[list[str]] = []

    def encode(self, prompts: list[str]) -> TextBatch:
        self.encoded.append(list(prompts))
        flag = torch.tensor([[1.0 if BOOM in p else 0.0] for p in prompts])
        return TextBatch(torch.zeros(len(prompts), 1, 384), torch.ones(len(prompts), 1,
                                                                        dtype=torch.bool),
                         torch.cat([flag, torch.zeros(len(prompts), 383)], 1))

    def denoise(self, x, t, d, text: TextBatch) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if bool((text.pooled[:, 0] > 0).any()):
            raise RuntimeError("engine exploded")
        return x * 0.5  # deterministic, depends on x only

    def decode(self, x: torch.Tensor) -> np.ndarray:
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def warmup(self, batch_sizes=(1,)) -> None:
        pass
