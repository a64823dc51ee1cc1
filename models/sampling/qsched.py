"""Quantization-aware scheduling (Q-Sched): correct a quantized denoiser in the sampler.

The quantized weights stay as they are; each step scales the model output by
c_m(i) and the current sample by c_s(i), both ramped linearly from a start pair
to 1 at the last step. The start pair is found per quantized engine by a search
(engines/qsched_search.py) and stored next to the build.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class QSched:
    model: float = 1.0  # c_m at the first step
    sample: float = 1.0  # c_s at the first step

    def at(self, step: int, steps: int) -> tuple[float, float]:
        """(c_m, c_s) at `step` of `steps`: the start pair at step 0, 1 at the last
        (a 1-step run uses the start pair)."""
        ramp = step / (steps - 1) if steps > 1 else 0.0
        return (self.model + (1.0 - self.model) * ramp,
                self.sample + (1.0 - self.sample) * ramp)

    @property
    def identity(self) -> bool:
        return self.model == 1.0 and self.sample == 1.0

    def save(self, path: Path, **extra: object) -> None:
        path.write_text(json.dumps({**asdict(self), **extra}, indent=2))

    @staticmethod
    def load(path: Path) -> QSched:
        data = json.loads(path.read_text())
        return QSched(model=float(data["model"]), sample=float(data["sample"]))
