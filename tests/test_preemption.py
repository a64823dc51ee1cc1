"""Preemption made explicit and bounded: a request left out of a forward by
higher-ranked work is counted as paused and resumes with its full state; a byte budget
on live request state makes new requests wait, or moves paused state to the host;
resumed requests give the images unpaused ones give."""

import numpy as np
import pytest
import torch

from fakes import Clock, TimedEngine, drain, drain_with_stats
from stepserve.models.caches.config import CacheConfig
from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore
from stepserve.server.scheduler.events import Completed, Failed
from stepserve.server.scheduler.live_state import move_states, state_bytes, tensor_bytes
from stepserve.server.scheduler.request import GenerationParams, Request


def params(steps=8, n=1, priority=0, seed=1, cache=None):
    return GenerationParams("p", steps, seed, 1.0, n=n, priority=priority, cache=cache)


def core_for(engine, clock, max_batch=4, budget=None, offload=False):
    return SchedulerCore(engine, SchedulerConfig(max_batch_size=max_batch,
                                                 live_state_bytes=budget, offload=offload),
                         clock)


def images(events):
    return {e.request_id: e.images for e in events if isinstance(e, Completed)}


def alone(engine_factory, reqs):
    """Each request's images run by itself, never paused."""
    out = {}
    for rid, p in reqs:
        clock = Clock()
        core = core_for(engine_factory(clock), clock)
        core.submit(Request(rid, p, 0.0))
        out.update(images(drain(core, 500)))
    return out


def test_state_bytes_count_each_per_request_tensor_once():
    shared = torch.zeros(10)
    assert tensor_bytes((shared, [shared], {"a": shared[:5]})) == 40  # one storage
    clock = Clock()
    core = core_for(TimedEngine(clock), clock)
    core.submit(Request("a", params(n=2), 0.0))
    core.step()
    req = core.running[0]
    s = req.states[0]
    want = sum(t.untyped_storage().nbytes() for t in (s.x, s.cond.tokens, s.cond.mask,
                                                      s.cond.pooled, s.uncond.tokens,
                                                      s.uncond.mask, s.uncond.pooled))
    if s.x0 is not None:
        want += s.x0.untyped_storage().nbytes()
    assert state_bytes([s]) == want and req.state_bytes == state_bytes(req.states)
    moved = move_states(req.states, torch.device("cpu"))
    assert torch.equal(moved[0].x, s.x) and moved[0].lora is s.lora


def low_and_urgent(core, clock, cache=None):
    """Four low-priority requests fill the batch; after two forwards an urgent request
    that needs every row arrives. Returns its events and the stats of each step."""
    for i in range(4):
        core.submit(Request(f"low{i}", params(priority=5, seed=10 + i, cache=cache),
                            clock.now))
    events, stats = [], []
    for _ in range(2):
        events += core.step()
        stats.append(core.last_stats)
    core.submit(Request("urgent", params(steps=4, n=4, seed=99), clock.now))
    more, rest = drain_with_stats(core)
    return events + more, stats + rest


def test_paused_requests_are_counted_and_resume_with_the_same_images():
    clock = Clock()
    engine = TimedEngine(clock)
    core = core_for(engine, clock)
    events, stats = low_and_urgent(core, clock)
    assert not [e for e in events if isinstance(e, Failed)]  # a gap, never an error
    assert sum(s.preempted for s in stats) == 4  # all four, once each
    pauses = [p for s in stats for p in s.paused_s]
    assert len(pauses) == 4 and min(pauses) > 0
    assert max(s.paused_rows for s in stats) == 4
    done = images(events)
    want = alone(TimedEngine, [(f"low{i}", params(priority=5, seed=10 + i)) for i in range(4)])
    for rid, img in want.items():
        assert np.array_equal(done[rid], img)


def test_past_the_budget_new_requests_wait_for_admission():
    clock = Clock()
    probe = core_for(TimedEngine(clock), clock, budget=1)
    probe.submit(Request("probe", params(), 0.0))
    probe.step()
    row = probe.running[0].state_bytes
    assert row > 0
    clock = Clock()
    core = core_for(TimedEngine(clock), clock, budget=2 * row)
    for i in range(4):
        core.submit(Request(f"r{i}", params(seed=i), 0.0))
    events = core.step()  # one request first: no state measured yet
    assert len(core.running) == 1 and core.last_stats.state_waits == 3
    events += core.step()  # then by the measured size: one more fits
    assert len(core.running) == 2 and len(core.waiting) == 2
    assert core.last_stats.state_waits == 2 and core.last_stats.live_bytes <= 2 * row
    events += drain(core, 500)
    done = images(events)
    assert sorted(done) == ["r0", "r1", "r2", "r3"]  # nothing lost, all served in turn
    want = alone(TimedEngine, [(f"r{i}", params(seed=i)) for i in range(4)])
    assert all(np.array_equal(done[k], want[k]) for k in want)


@pytest.mark.parametrize("cache", [None, CacheConfig("ab-cache", interval=3)])
def test_past_the_budget_paused_state_moves_to_the_host_and_back(cache):
    """Also with a step cache, whose predicted steps run without a forward."""
    clock = Clock()
    probe = core_for(TimedEngine(clock), clock, budget=1)
    probe.submit(Request("probe", params(), 0.0))
    probe.step()
    row = probe.running[0].state_bytes
    clock = Clock()
    # four low rows fill the budget; the urgent request's four rows share one prompt
    core = core_for(TimedEngine(clock), clock, budget=int(4.5 * row), offload=True)
    events, stats = low_and_urgent(core, clock, cache)
    out = sum(s.offloaded_rows for s in stats)
    back = sum(s.restored_rows for s in stats)
    assert out >= 1 and back == out  # paused rows left the device and all came back
    assert max(s.live_bytes for s in stats) <= int(4.5 * row)
    done = images(events)
    want = alone(TimedEngine, [(f"low{i}", params(priority=5, seed=10 + i, cache=cache))
                               for i in range(4)])
    assert all(np.array_equal(done[k], want[k]) for k in want)


def test_builtin_model_resumes_within_two_grey_levels(engine):
    """fp32 built-in model: preempted, offloaded and resumed against never paused."""
    clock = Clock()

    def run(budget):
        core = SchedulerCore(engine, SchedulerConfig(max_batch_size=3, live_state_bytes=budget,
                                                     offload=True))
        reqs = [GenerationParams("a small red circle in the top left on a white background",
                                 8, 40 + i, 1.0, priority=5) for i in range(3)]
        for i, p in enumerate(reqs):
            core.submit(Request(f"low{i}", p, clock.now))
        events, stats = [], []
        for _ in range(3):
            events += core.step()
            stats.append(core.last_stats)
        row = core.running[0].state_bytes
        if budget is not None:
            core.submit(Request("urgent", GenerationParams("a large blue square", 4, 7, 1.0,
                                                           n=3), clock.now))
        more, rest = drain_with_stats(core)
        return images(events + more), stats + rest, row

    plain, _, row = run(None)
    paused, stats, _ = run(int(3.5 * row))
    assert sum(s.preempted for s in stats) == 3 and sum(s.offloaded_rows for s in stats) >= 1
    for k in plain:
        diff = np.abs(paused[k].astype(int) - plain[k].astype(int)).max()
        assert diff <= 2, (k, diff)
    assert "urgent" in paused
