"""`quality`: fixed levels from the model's presets, and `auto` degrading under load
(at admission) or when a request falls behind (its safe cache switched on at a step
boundary), driven with a fake engine that takes fake time."""

import pytest
import torch

from fakes import Clock, TimedEngine, drain
from stepserve.models.caches.ab_cache import ABState
from stepserve.models.caches.config import CacheConfig
from stepserve.server.errors import APIError
from stepserve.server.protocol import ImageGenerationRequest
from stepserve.server.quality import apply_quality
from stepserve.server.redis.codec import params_from_json, params_to_json
from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore
from stepserve.server.scheduler.events import Completed
from stepserve.server.scheduler.plan import Plan, ladder
from stepserve.server.scheduler.request import GenerationParams, Request

SAFE = CacheConfig("ab-cache", order=2, interval=3)


def counted_forwards(cache, steps):
    """Forwards the policy really runs, stepping its own state."""
    state, run = cache.new_state(), 0
    for step in range(steps):
        t = 1 - step / steps
        if cache.must_compute(state, step, steps, t):
            state, run = cache.record(state, t, torch.zeros(1)), run + 1
        else:
            state = cache.skipped(state)
    return run


@pytest.mark.parametrize("cache", [SAFE, CacheConfig("ab-cache"),
                                   CacheConfig("ab-cache", interval=4, max_skips=2)])
def test_a_cache_counts_the_forwards_it_runs(cache):
    assert isinstance(cache.new_state(), ABState)
    for steps in (1, 2, 3, 4, 8, 16, 33):
        assert cache.forwards(steps) == counted_forwards(cache, steps)
    assert CacheConfig("ab-cache", threshold=0.1).forwards(16) == 16  # adaptive: all
    assert CacheConfig("teacache").forwards(16) == 16


def test_the_ladder_caps_steps_and_keeps_only_cheaper_plans():
    levels = [Plan("high", 8), Plan("medium", 8, SAFE), Plan("low", 2)]
    plans = ladder(Plan("asked", 16), levels)
    assert [(p.level, p.steps, p.forwards) for p in plans] == [
        ("asked", 16, 16), ("high", 8, 8), ("medium", 8, 4), ("low", 2, 2)]
    plans = ladder(Plan("asked", 4), levels)  # a ceiling of 4 steps
    assert [(p.level, p.steps, p.forwards) for p in plans] == [
        ("asked", 4, 4), ("medium", 4, 2)]  # high (4 steps) costs no less; low ties


def body(**kw):
    return ImageGenerationRequest(prompt="p", **kw)


def resolved(steps=16, timeout=None, priority=0, **kw):
    caps = TimedEngine(Clock()).capabilities
    params = GenerationParams("p", steps, 1, 1.0, timeout_s=timeout, priority=priority)
    return apply_quality(body(**kw), params, caps, "builtin", "torch")


def test_levels_map_to_the_models_presets():
    assert resolved() == GenerationParams("p", 16, 1, 1.0)  # omitted: exactly as sent
    assert resolved(quality="standard") == GenerationParams("p", 16, 1, 1.0)
    high, hd = resolved(quality="high"), resolved(quality="hd")
    assert (high.steps, high.cache, high.quality) == (8, None, "high") and hd == high
    medium = resolved(quality="medium")
    assert (medium.steps, medium.cache) == (8, SAFE)
    low = resolved(quality="low", num_inference_steps=1)  # an explicit count is a ceiling
    assert (low.steps, low.quality) == (1, "low")
    capped = apply_quality(body(quality="high"), GenerationParams("p", 4, 1, 1.0),
                           TimedEngine(Clock()).capabilities, "m", "e", max_steps=6)
    assert capped.steps == 6  # and so is the server's max_steps
    kept = resolved(quality="medium", cache="none")  # an explicit cache wins
    assert kept.cache is None
    auto = resolved(quality="auto")
    assert auto.quality == "auto" and auto.safe_cache == SAFE and auto.level is None
    assert [p.level for p in auto.ladder] == ["asked", "high", "medium", "low"]
    assert params_from_json(params_to_json(auto)) == auto  # through Redis
    with pytest.raises(APIError) as err:
        apply_quality(body(quality="auto"), GenerationParams(
            "p", 3, 1, 1.0, schedule=(("timesteps", (900.0, 500.0, 100.0)),)),
            TimedEngine(Clock()).capabilities, "m", "e")
    assert err.value.param == "quality"


def make(max_batch=4):
    clock = Clock()
    engine = TimedEngine(clock)
    core = SchedulerCore(engine, SchedulerConfig(max_batch_size=max_batch), clock)
    for rid, n in (("warm1", 1), ("warm4", max_batch)):  # measure forwards of 1 and 4 rows
        core.submit(Request(rid, GenerationParams("p", 2, 1, 1.0, n=n), clock.now))
        drain(core, 50)
    return clock, engine, core


def test_auto_runs_as_asked_when_the_deadline_allows():
    clock, engine, core = make()
    req = Request("a", resolved(timeout=3.0, quality="auto"), clock.now)
    core.submit(req)
    assert (req.params.level, req.params.steps, req.degraded) == ("asked", 16, None)
    assert req.params.ladder == () and req.predicted_s == pytest.approx(16 * 0.11)
    done = [e for e in drain(core, 100) if isinstance(e, Completed)]
    assert (done[0].steps, done[0].cache, done[0].level) == (16, None, "asked")


def test_auto_degrades_at_admission_to_the_best_plan_that_fits():
    clock, engine, core = make()
    for i in range(2):  # 2 x 4 rows x 10 steps ahead, earlier deadlines
        core.submit(Request(f"bulk{i}", GenerationParams("p", 10, 1, 1.0, n=4, timeout_s=3.0),
                            clock.now))
    req = Request("a", resolved(timeout=4.3, quality="auto"), clock.now)
    core.submit(req)
    # asked: 20 + 8 forwards x 0.14 s = 3.9 s, high: 24 x 0.14 = 3.4 s fits within the
    # headroom (0.8 x 4.3 s = 3.44 s)
    assert (req.params.level, req.params.steps, req.degraded) == ("high", 8, "load")
    tight = Request("b", resolved(timeout=3.0, quality="auto"), clock.now)
    core.submit(tight)
    assert tight.params.level == "low"  # nothing fits: the cheapest (admission refuses it)
    fixed = Request("c", resolved(timeout=3.5, quality="high"), clock.now)
    core.submit(fixed)
    assert (fixed.params.steps, fixed.params.level, fixed.degraded) == (8, None, None)


def test_a_request_that_falls_behind_takes_its_safe_cache_once():
    clock, engine, core = make(max_batch=1)
    req = Request("a", resolved(timeout=3.0, quality="auto"), clock.now)
    fixed = Request("f", resolved(timeout=3.0), clock.now)
    core.submit(req)
    assert req.params.level == "asked"
    for _ in range(3):
        core.step()
    assert req.step == 3
    core.submit(Request("urgent", GenerationParams("p", 12, 1, 1.0, priority=-1), clock.now))
    core.submit(fixed)
    forwards = len(engine.batches)
    events = drain(core, 200)
    assert req.degraded == "behind" and req.params.cache == SAFE
    assert fixed.params.cache is None and fixed.degraded is None  # fixed quality: never
    done = {e.request_id: e for e in events if isinstance(e, Completed)}
    assert done["a"].cache == "ab-cache" and done["a"].steps == 16
    assert "urgent" in done and "f" not in done  # the fixed one could not make it: dropped
    assert clock.now <= req.deadline
    # 12 urgent steps; then from step 3 the cache skips: fewer than 13 more of its own
    assert len(engine.batches) - forwards - 12 < 13
