"""`quality: auto`: the choice among a request's plans (plan.py).

The backend picks the best plan whose forecast meets the deadline when it admits the
request; the core may switch the model's safe cache on once, at a step boundary, for
a request that has fallen behind (deadlines.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .forecast import HEADROOM, Forecast
from .plan import Plan
from .request import GenerationParams, Request


def choose(params: GenerationParams, fits: Callable[[GenerationParams], bool]
           ) -> GenerationParams:
    """An auto request's plan: the best that `fits` (meets its deadline), else the
    cheapest; the result carries no ladder (chosen once)."""
    if not params.ladder:
        return params
    options = [with_plan(params, plan) for plan in params.ladder]
    return next((p for p in options if fits(p)), options[-1])


def with_plan(params: GenerationParams, plan: Plan) -> GenerationParams:
    return replace(params, steps=plan.steps, cache=plan.cache, level=plan.level, ladder=())


def plan(req: Request, forecast: Callable[[GenerationParams], Forecast | None],
         enforce: bool) -> None:
    """An auto request's plan: the best whose forecast meets its deadline with headroom
    (any plan fits without one, or when deadlines are not enforced); a plan below the
    request as asked is degraded by load. Sets the forecast it was admitted with."""
    params = req.params
    if not params.ladder:
        return
    deadline = params.timeout_s

    def fits(p: GenerationParams) -> bool:
        if deadline is None or not enforce:
            return True
        fc = forecast(p)
        return fc is None or fc.expected <= HEADROOM * deadline

    req.params = choose(params, fits)
    if req.params.level != params.ladder[0].level:
        req.degraded = "load"
    fc = forecast(req.params)
    req.predicted_s = None if fc is None else fc.expected
