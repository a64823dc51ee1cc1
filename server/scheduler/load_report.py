"""A core's load as plain numbers, so that a process without the model (the scaled-out
API role) can forecast a request's finish as the core would: each worker publishes
its report, and the API combines them to refuse at once what would miss its deadline.

The combination is coarser than the core's own forecast: it cannot order the work by
deadline, so it counts all of it as ahead, spread evenly over the workers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .forecast import Forecast, StepTimes, forecast, forwards_left
from .quality import with_plan
from .request import GenerationParams

if TYPE_CHECKING:
    from .core import SchedulerCore

MAX_AGE_S = 5.0  # an older report (a worker gone quiet) is not counted


def report(core: SchedulerCore) -> dict:
    reqs = list(core.waiting) + list(core.running)  # copies: the core's thread runs on
    return {"at": time.time(), "times": core.step_times.to_json(),
            "backlog": sum(r.samples * forwards_left(r.params, r.step) for r in reqs),
            "rows": sum(r.samples for r in reqs), "max_batch": core.config.max_batch_size,
            "deadlines": core.config.deadlines}


def combined_forecast(reports: Sequence[dict], params: GenerationParams, queued_jobs: int,
                      now: float | None = None) -> Forecast | None:
    """When a new request would finish on the workers that reported (None: no fresh
    report with measured forwards, or deadlines off there). `queued_jobs` are on the
    stream, taken by no worker yet: each counted as costly as this one. An auto request
    is judged at its cheapest plan (its worker chooses the plan)."""
    now = time.time() if now is None else now
    fresh = [r for r in reports if now - r["at"] <= MAX_AGE_S and r["deadlines"]
             and r["times"]["ema"]]
    if not fresh:
        return None
    if params.ladder:
        params = with_plan(params, params.ladder[-1])
    workers = len(fresh)
    own = forwards_left(params, 0)
    ahead = (sum(r["backlog"] for r in fresh) + queued_jobs * params.n * own) / workers
    rows = (sum(r["rows"] for r in fresh) + queued_jobs * params.n) / workers
    times = StepTimes.from_json(max(fresh, key=lambda r: len(r["times"]["ema"]))["times"])
    return forecast(times, params.n, own, ahead, round(rows), fresh[0]["max_batch"])
