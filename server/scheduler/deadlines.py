"""Deadline decisions over the core's requests: when a new one would finish, which can no
longer finish in time (dropped), and which `quality: auto` requests have fallen behind
(their safe cache switched on). The core retires and reports; this module only decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from stepserve.models.sampling.batch import with_cache

from .backend import DeadlineUnreachable, QueueFull
from .events import Failed, FinishReason
from .forecast import HEADROOM, Forecast, StepTimes, forecast, forwards_left
from .policy import BatchPolicy
from .request import GenerationParams, Request


@dataclass
class Deadlines:
    policy: BatchPolicy
    max_batch: int
    times: StepTimes

    @staticmethod
    def rows(reqs: Sequence[Request]) -> int:
        return sum(r.samples for r in reqs)

    def forecast(self, reqs: Sequence[Request], params: GenerationParams, now: float,
                 req: Request | None = None) -> Forecast | None:
        """When a request finishes (a new one with `params`, or `req` of `reqs` from its
        current step), behind the work in `reqs` ordered before it."""
        own = req if req is not None else Request("", params, now)
        key = self.policy.key(own, now)
        ahead = sum(r.samples * forwards_left(r.params, r.step) for r in reqs
                    if r is not own and self.policy.key(r, now) <= key)
        rows = self.rows(reqs) - (own.samples if req is not None else 0)
        return forecast(self.times, params.n, forwards_left(params, own.step), ahead,
                        rows, self.max_batch)

    def unreachable(self, reqs: Sequence[Request], now: float) -> list[tuple[Request, float]]:
        """Requests that cannot finish before their deadline even in every forward from
        now at the fastest seen for the batch the load makes (a lower bound, so a slow
        spell condemns nothing), with the seconds they still need."""
        if not self.times.known:
            return []
        batch = max(1, min(self.max_batch, self.rows(reqs)))
        out = []
        for req in reqs:
            if req.deadline is None:
                continue
            step_s = self.times.fastest(max(req.samples, batch))
            assert step_s is not None
            need = forwards_left(req.params, req.step) * step_s
            if now + need > req.deadline:
                out.append((req, need))
        return out

    def behind(self, reqs: Sequence[Request], now: float) -> list[Request]:
        """Auto requests not yet revised whose forecast now misses their deadline: their
        model's safe cache is switched on from the next step (once). One pass in policy
        order (the work ahead of each is the running sum), not one forecast each."""
        revised: list[Request] = []
        if not any(r.params.level is not None and not r.degraded for r in reqs):
            return revised
        rows, ahead = self.rows(reqs), 0.0
        for req in self.policy.order(reqs, now):
            p = req.params
            own = forwards_left(p, req.step)
            candidate = (p.level is not None and p.safe_cache is not None and p.cache is None
                         and req.deadline is not None and req.picard is None
                         and not req.degraded)
            if candidate:
                assert req.deadline is not None and p.safe_cache is not None
                fc = forecast(self.times, p.n, own, ahead, rows - req.samples, self.max_batch)
                cheaper = replace(p, cache=p.safe_cache)
                if (fc is not None and now + fc.expected > req.deadline
                        and forwards_left(cheaper, req.step) < own):
                    req.params = cheaper
                    req.states = [with_cache(s, p.safe_cache) for s in req.states]
                    req.degraded = "behind"
                    revised.append(req)
            ahead += req.samples * forwards_left(req.params, req.step)
        return revised

def dropped(req: Request, need: float, now: float) -> Failed:
    """The event of a request dropped because its deadline became unreachable."""
    assert req.deadline is not None
    return Failed(req.id, FinishReason.TIMEOUT,
                  f"dropped at step {req.step}/{req.params.steps}: it can no longer finish "
                  f"within its timeout of {req.params.timeout_s:g} s (needs about "
                  f"{need:.2f} s more, {max(0.0, req.deadline - now):.2f} s left)",
                  "deadline_unreachable")


def refuse_late(fc: Forecast | None, timeout: float) -> float | None:
    """Refuse now what cannot finish in time: DeadlineUnreachable when even running in
    every forward from now is too slow; QueueFull with the wait until it would fit when
    the work ahead of it is (an honest Retry-After: the forecast's excess over the
    admission bound, HEADROOM of the deadline). Returns the forecast seconds to finish
    (None: nothing measured yet, so admitted)."""
    if fc is None:
        return None
    if fc.earliest > timeout:
        raise DeadlineUnreachable(
            f"the request needs about {fc.earliest:.3g} s even in every forward from "
            f"now, over its timeout of {timeout:.3g} s")
    bound = HEADROOM * timeout
    if fc.expected > bound:
        raise QueueFull(f"the work queued ahead would make this request finish in about "
                        f"{fc.expected:.2f} s, too close to its timeout of {timeout:g} s "
                        f"(admitted within {HEADROOM:g} of it)", fc.expected - bound,
                        deadline=True)
    return fc.expected
