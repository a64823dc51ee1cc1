"""When will a request finish? The cost model behind deadline-aware admission and
dropping: measured seconds per batched forward by batch size, and the denoiser rows
of the work ordered before the request.

Step-level batching keeps the batch full while work is queued, so a request that
has `ahead` row-steps ordered before it joins the batch once those have drained to
the rows that will run beside it (on average half-way through theirs), and then
needs its own S steps: about ahead / B + S / 2 forwards of B rows, never fewer
than S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .request import GenerationParams


@dataclass
class StepTimes:
    """Seconds per forward by rows in the batch: an exponential moving average per
    size seen; other sizes interpolated linearly between the nearest seen ones (or
    scaled from the one seen, for sizes outside them)."""

    alpha: float = 0.2
    _ema: dict[int, float] = field(default_factory=dict)
    _fastest: dict[int, float] = field(default_factory=dict)

    def observe(self, rows: int, seconds: float) -> None:
        if rows < 1 or seconds <= 0:
            return
        old = self._ema.get(rows)
        self._ema[rows] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        self._fastest[rows] = min(seconds, self._fastest.get(rows, seconds))

    @property
    def known(self) -> bool:
        return bool(self._ema)

    def at(self, rows: int) -> float | None:
        """The expected time of a forward of `rows` (recent average)."""
        return _interpolate(self._ema, rows)

    def fastest(self, rows: int) -> float | None:
        """The fastest such forward seen: a lower bound, for deciding that a deadline
        cannot be met (a slow spell must not condemn a request)."""
        return _interpolate(self._fastest, rows)

    def to_json(self) -> dict:
        return {"ema": self._ema, "fastest": self._fastest}

    @staticmethod
    def from_json(d: dict) -> StepTimes:
        return StepTimes(_ema={int(k): float(v) for k, v in d["ema"].items()},
                         _fastest={int(k): float(v) for k, v in d["fastest"].items()})


def _interpolate(table: dict[int, float], rows: int) -> float | None:
    if not table:
        return None
    rows = max(1, rows)
    if rows in table:
        return table[rows]
    sizes = sorted(table)
    below = [s for s in sizes if s < rows]
    above = [s for s in sizes if s > rows]
    if below and above:
        lo, hi = below[-1], above[0]
        w = (rows - lo) / (hi - lo)
        return (1 - w) * table[lo] + w * table[hi]
    near = below[-1] if below else above[0]
    # beyond the largest size seen: its time per row (a bigger batch is never faster per
    # forward); below the smallest: the smallest's time
    return table[near] * (rows / near if rows > near else 1.0)


# admission (and auto's plan) wants the forecast to finish within this share of the
# deadline: the forecast is an average, and a request admitted right at its deadline
# misses about half the time, after costing forwards (then it is dropped)
HEADROOM = 0.8


@dataclass(frozen=True)
class Forecast:
    earliest: float  # seconds from now alone in every forward, at the fastest seen
    expected: float  # seconds from now, the work ordered before it included


def forwards_left(params: GenerationParams, step: int) -> float:
    """Forwards a request still needs from `step`: its steps, fewer where its step cache
    skips whole steps on a fixed pattern (spread evenly over the schedule)."""
    total = params.steps if params.cache is None else params.cache.forwards(params.steps)
    return total * max(0, params.steps - step) / params.steps


def forecast(times: StepTimes, own_rows: int, own_steps: float, ahead_row_steps: float,
             rows_in_flight: int, max_batch: int) -> Forecast | None:
    """None until forwards have been measured. `own_steps` and `ahead_row_steps` count
    forwards (a step cache's skipped steps take none). The batch it will run in is set
    by the load (every row in flight, up to the largest batch), not chosen for it."""
    if not times.known or own_steps <= 0:
        return None
    alone = times.fastest(own_rows)
    assert alone is not None
    batch = max(own_rows, min(max_batch, rows_in_flight + own_rows))
    step_s = times.at(batch)
    assert step_s is not None
    # it joins the batch once the work ahead has drained to the rows still running with
    # it, on average half-way through theirs: then its own steps run
    forwards = max(own_steps, math.ceil(ahead_row_steps / batch + own_steps / 2))
    return Forecast(own_steps * alone, forwards * step_s)
