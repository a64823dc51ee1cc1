"""The scheduler core with a fake engine and a fake clock: no model, no threads."""

import pytest

from fakes import BOOM, Clock, FakeEngine, drain
from stepserve.server.scheduler.core import QueueFull, SchedulerConfig, SchedulerCore
from stepserve.server.scheduler.events import Completed, Failed, FinishReason, Preview
from stepserve.server.scheduler.request import GenerationParams, Request, Status, preview_steps


def make(config=None, clock=None):
    engine = FakeEngine()
    return engine, SchedulerCore(engine, config or SchedulerConfig(max_batch_size=4),
                                 clock or Clock())


def req(rid, steps=4, n=1, priority=0, arrival=0.0, prompt="p", partial=0, timeout=None,
        guidance=1.0):
    return Request(rid, GenerationParams(prompt, steps, seed=1, guidance=guidance, n=n,
                                         priority=priority, partial_images=partial,
                                         timeout_s=timeout), arrival)


run = drain


def test_requests_join_and_leave_between_steps():
    engine, core = make()
    core.submit(req("a", steps=4))
    core.step()
    core.step()
    core.submit(req("b", steps=2))  # joins while "a" is at step 2
    events = core.step()
    assert engine.batches[-1] == 2, "one forward carries both requests"
    assert {r.id: r.step for r in core.running} == {"a": 3, "b": 1}
    events += core.step()
    done = [e.request_id for e in events if isinstance(e, Completed)]
    assert sorted(done) == ["a", "b"], "both finish on the same step, at different step counts"
    assert not core.has_work


def test_batch_respects_max_size_and_priority_then_arrival():
    engine, core = make(SchedulerConfig(max_batch_size=2, aging_s=1e9))
    core.submit(req("low", priority=5, arrival=0))
    core.submit(req("first", arrival=1))
    core.submit(req("second", arrival=2))
    core.submit(req("urgent", priority=-1, arrival=3))
    core.step()
    assert engine.batches == [2]
    stepped = {r.id for r in core.running if r.step == 1}
    assert stepped == {"urgent", "first"}


def test_aging_prevents_starvation():
    clock = Clock()
    engine, core = make(SchedulerConfig(max_batch_size=1, aging_s=2.0), clock)
    core.submit(req("low", priority=3, steps=50, arrival=0))
    for i in range(3):
        core.submit(req(f"hi{i}", priority=0, steps=50, arrival=0))
    served_low_at = None
    for tick in range(40):
        clock.now = float(tick)
        core.step()
        low = next(r for r in core.running if r.id == "low")
        if low.step > 0:
            served_low_at = tick
            break
    assert served_low_at is not None and served_low_at < 20


def test_aging_admits_an_old_low_priority_request_despite_new_urgent_ones():
    clock = Clock()
    engine, core = make(SchedulerConfig(max_batch_size=1, aging_s=1.0), clock)
    core.submit(req("old", priority=5, steps=1, arrival=0))
    finished = []
    for tick in range(30):
        clock.now = float(tick)
        core.submit(req(f"new{tick}", priority=0, steps=1, arrival=float(tick)))
        finished += [e.request_id for e in core.step() if isinstance(e, Completed)]
        if "old" in finished:
            break
    assert "old" in finished and len(finished) < 15


def test_n_images_travel_together_and_differ_by_seed():
    engine, core = make()
    core.submit(req("a", n=3, steps=2))
    events = run(core)
    (done,) = [e for e in events if isinstance(e, Completed)]
    assert done.images.shape == (3, 4, 4, 3)
    assert engine.batches == [3, 3]
    assert not (done.images[0] == done.images[1]).all()


def test_request_mode_runs_batch_to_completion_before_admitting():
    engine, core = make(SchedulerConfig(batching="request", max_batch_size=4))
    core.submit(req("a", steps=3))
    core.step()
    core.submit(req("b", steps=1))
    core.step()
    assert [r.id for r in core.running] == ["a"] and core.waiting[0].id == "b"
    run(core)
    assert engine.batches == [1, 1, 1, 1]


def test_queue_bound():
    _, core = make(SchedulerConfig(max_batch_size=2, max_queue=2))
    core.submit(req("a"))
    core.submit(req("b"))
    with pytest.raises(QueueFull):
        core.submit(req("c"))
    with pytest.raises(ValueError, match="max batch"):
        make(SchedulerConfig(max_batch_size=2, max_queue=9))[1].submit(req("d", n=3))


def test_cancel_leaves_before_next_forward():
    engine, core = make()
    core.submit(req("a"))
    core.submit(req("b"))
    core.step()
    assert core.cancel("a").status == Status.CANCELLED
    core.step()
    assert engine.batches == [2, 1]
    assert core.cancel("missing") is None


def test_timeout_frees_slot_with_error():
    clock = Clock()
    engine, core = make(clock=clock)
    core.submit(req("slow", steps=10, timeout=2.5))
    core.submit(req("ok", steps=10))
    events = []
    for tick in range(4):
        clock.now = float(tick)
        events += core.step()
    (failed,) = [e for e in events if isinstance(e, Failed)]
    assert failed.request_id == "slow" and failed.reason is FinishReason.TIMEOUT
    assert "timed out" in failed.message
    assert [r.id for r in core.running] == ["ok"]


def test_engine_failure_fails_only_that_batch_and_core_keeps_serving():
    engine, core = make(SchedulerConfig(max_batch_size=1, aging_s=1e9))
    core.submit(req("bad", prompt=f"a {BOOM} prompt", priority=-1))
    core.submit(req("good", steps=2))
    events = run(core)
    failed = [e for e in events if isinstance(e, Failed)]
    completed = [e for e in events if isinstance(e, Completed)]
    assert [e.request_id for e in failed] == ["bad"] and failed[0].reason is FinishReason.ERROR
    assert [e.request_id for e in completed] == ["good"]


class RefusingEngine(FakeEngine):
    """init_state raises for a request's own parameters (e.g. a schedule a sampler
    refuses) or because the engine broke."""

    def init_state(self, seed, steps, cond, uncond, **kw):
        if seed == 666:
            raise ValueError("timesteps must decrease")
        if seed == 667:
            raise RuntimeError("out of memory")
        return super().init_state(seed, steps, cond, uncond, **kw)


def test_a_request_whose_state_cannot_be_built_fails_alone_and_once():
    engine = RefusingEngine()
    core = SchedulerCore(engine, SchedulerConfig(max_batch_size=8))
    core.submit(Request("bad", GenerationParams("p", 3, seed=666, guidance=1.0), 0.0))
    core.submit(Request("broken", GenerationParams("p", 3, seed=667, guidance=1.0), 0.0))
    core.submit(Request("good", GenerationParams("p", 3, seed=1, guidance=1.0), 0.0))
    first = core.step()  # all three admitted together: two fail at once, one forward runs
    failed = {e.request_id: e for e in first if isinstance(e, Failed)}
    assert set(failed) == {"bad", "broken"}
    assert failed["bad"].reason is FinishReason.INVALID
    assert "timesteps must decrease" in failed["bad"].message
    assert failed["broken"].reason is FinishReason.ERROR
    assert [r.id for r in core.running] == ["good"] and not core.waiting
    assert engine.batches == [1]
    rest = run(core)  # never re-admitted: no second failure event
    assert not [e for e in rest if isinstance(e, Failed)]
    assert [e.request_id for e in rest if isinstance(e, Completed)] == ["good"]


def test_previews_are_evenly_spread_x0_predictions():
    assert preview_steps(8, 3) == (2, 4, 6)
    assert preview_steps(4, 3) == (1, 2, 3)
    assert preview_steps(2, 3) == (1,)
    assert preview_steps(1, 2) == () and preview_steps(8, 0) == ()
    engine, core = make()
    core.submit(req("a", steps=8, partial=3))
    events = run(core)
    previews = [e for e in events if isinstance(e, Preview)]
    assert [(p.index, p.step) for p in previews] == [(0, 2), (1, 4), (2, 6)]
    assert isinstance(events[-1], Completed)
    assert previews[0].images.shape == (1, 4, 4, 3)


def test_text_encoding_is_batched_at_admission():
    engine, core = make()
    for i in range(3):
        core.submit(req(f"r{i}", prompt=f"prompt {i}"))
    core.step()
    assert len(engine.encoded) == 1 and len(engine.encoded[0]) == 6  # 3 prompts + 3 negatives


def test_guidance_adds_uncond_rows():
    engine, core = make()
    core.submit(req("g", guidance=3.0))
    core.step()
    assert engine.batches == [2]
