"""Deadlines in the scheduler core, with a fake engine that takes fake time: the cost
model, earliest deadline first, refusing early (429 / 504) and dropping rows whose
deadline became unreachable, without starving requests that have none."""

import pytest

from fakes import Clock, FakeEngine, TimedEngine, drain
from stepserve.server.scheduler.backend import DeadlineUnreachable, QueueFull
from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore
from stepserve.server.scheduler.events import Completed, Failed, FinishReason
from stepserve.server.scheduler.forecast import StepTimes, forecast
from stepserve.server.scheduler.loop import EngineLoop
from stepserve.server.scheduler.request import GenerationParams, Request


def make(max_batch=4, aging_s=5.0):
    clock = Clock()
    engine = TimedEngine(clock)
    core = SchedulerCore(engine, SchedulerConfig(max_batch_size=max_batch, aging_s=aging_s),
                         clock)
    return clock, engine, core


def params(steps=4, timeout=None, priority=0, n=1):
    return GenerationParams("p", steps, 1, 1.0, n=n, timeout_s=timeout, priority=priority)


def run(core):
    return drain(core, 500)


def warm(core, clock):
    """Measure the forward times at batch 1 and 4."""
    for rid, n in (("warm1", 1), ("warm4", 4)):
        core.submit(Request(rid, params(steps=2, n=n), clock.now))
        run(core)


def test_step_times_are_measured_and_interpolated():
    times = StepTimes()
    assert forecast(times, 1, 4, 0, 0, 8) is None  # nothing measured: no forecast
    times.observe(1, 0.11)
    times.observe(4, 0.14)
    assert times.at(1) == pytest.approx(0.11) and times.at(4) == pytest.approx(0.14)
    assert times.at(2) == pytest.approx(0.12)
    assert times.at(8) == pytest.approx(0.28)  # beyond the largest seen: per row
    times.observe(1, 0.5)  # a slow spell moves the average, not the lower bound
    assert times.at(1) == pytest.approx(0.188) and times.fastest(1) == pytest.approx(0.11)
    times = StepTimes()
    times.observe(1, 0.11)
    times.observe(4, 0.14)
    fc = forecast(times, 1, 4, ahead_row_steps=12, rows_in_flight=3, max_batch=4)
    assert fc.earliest == pytest.approx(4 * 0.11)  # its 4 steps alone
    assert fc.expected == pytest.approx(5 * 0.14)  # 12 / 4 forwards, then half its own
    fc = forecast(times, 1, 4, ahead_row_steps=40, rows_in_flight=10, max_batch=4)
    assert fc.expected == pytest.approx(12 * 0.14)  # 40 / 4 + 4 / 2 full forwards
    fc = forecast(times, 1, 4, ahead_row_steps=0, rows_in_flight=1, max_batch=4)
    assert fc.expected == pytest.approx(4 * 0.12)  # it shares each forward with one


def test_earliest_deadline_first_within_a_priority_class():
    clock, engine, core = make(max_batch=1)
    for rid, timeout in (("none", None), ("late", 50.0), ("soon", 10.0)):
        core.submit(Request(rid, params(steps=1, timeout=timeout), 0.0))
    order = [e.request_id for e in run(core) if isinstance(e, Completed)]
    assert order == ["soon", "late", "none"]
    core.submit(Request("urgent", params(steps=1, priority=-1), clock.now))
    core.submit(Request("deadline", params(steps=1, timeout=1.0), clock.now))
    order = [e.request_id for e in run(core) if isinstance(e, Completed)]
    assert order == ["urgent", "deadline"]  # a class outranks a deadline


def test_rows_whose_deadline_became_unreachable_leave_before_another_forward():
    clock, engine, core = make(max_batch=4)
    warm(core, clock)
    core.submit(Request("hopeless", params(steps=20, timeout=1.0), clock.now))
    core.submit(Request("fine", params(steps=4, timeout=5.0), clock.now))
    forwards = len(engine.batches)
    events = run(core)
    dropped = [e for e in events if isinstance(e, Failed)]
    assert [e.request_id for e in dropped] == ["hopeless"]
    assert dropped[0].reason is FinishReason.TIMEOUT and dropped[0].code == "deadline_unreachable"
    assert "can no longer finish" in dropped[0].message
    assert any(isinstance(e, Completed) and e.request_id == "fine" for e in events)
    # it left before costing a forward (20 steps x >= 0.11 s cannot fit in 1 s)
    assert engine.batches[forwards:] == [1, 1, 1, 1]


def test_a_reachable_row_is_never_dropped():
    clock, engine, core = make(max_batch=4)
    warm(core, clock)
    core.submit(Request("tight", params(steps=4, timeout=0.6), clock.now))  # 4 x 0.11 s
    events = run(core)
    assert [type(e) for e in events] == [Completed]


def test_admission_refuses_early_with_an_honest_retry_after():
    clock, engine, core = make(max_batch=4)
    warm(core, clock)
    loop = EngineLoop(core)
    with pytest.raises(DeadlineUnreachable, match="needs about"):
        loop._check_deadline(params(steps=40, timeout=2.0))  # 40 x 0.11 s > 2 s alone
    loop._check_deadline(params(steps=4, timeout=2.0))  # an idle server meets it
    for i in range(8):  # 8 x 4 images x 20 steps = 640 image-steps, earlier deadlines
        core.submit(Request(f"bulk{i}", params(steps=20, n=4, timeout=1.5), clock.now))
    with pytest.raises(QueueFull) as refused:
        loop._check_deadline(params(steps=4, timeout=2.0))
    expected = core.forecast(params(steps=4, timeout=2.0), clock.now).expected
    assert expected > 2.0 and refused.value.retry_after == pytest.approx(expected - 0.8 * 2.0)
    # with a deadline earlier than the queued work's, it goes first: admitted (EDF)
    for r in core.waiting:
        object.__setattr__(r.params, "timeout_s", 100.0)
    loop._check_deadline(params(steps=4, timeout=2.0))
    loop.stop()


def test_requests_without_a_deadline_are_not_starved_by_ones_with():
    clock, engine, core = make(max_batch=1, aging_s=1.0)
    core.submit(Request("patient", params(steps=1), 0.0))
    done = []
    for tick in range(60):
        core.submit(Request(f"d{tick}", params(steps=1, timeout=30.0), clock.now))
        done += [e.request_id for e in core.step() if isinstance(e, Completed)]
        if "patient" in done:
            break
    assert "patient" in done and len(done) < 30


def test_the_api_answers_unreachable_deadlines_at_once_and_slo_s_is_the_default():
    import time

    from inprocess import make_app
    from inprocess import run as run_app

    class SlowEngine(FakeEngine):
        def denoise(self, x, t, d, text):
            time.sleep(0.02)
            return super().denoise(x, t, d, text)

    app = make_app(SlowEngine(), slo_s=0.5, result_cache_mb=0)

    async def go(client, h):
        ok = await h.post("/v1/images/generations",
                          json={"prompt": "p", "num_inference_steps": 2})
        far = await h.post("/v1/images/generations",
                           json={"prompt": "p", "num_inference_steps": 60})
        given = await h.post("/v1/images/generations",
                             json={"prompt": "p", "num_inference_steps": 60, "timeout": 30})
        return ok, far, given, (await h.get("/metrics")).text

    ok, far, given, metrics = run_app(app, go)
    assert ok.status_code == 200
    assert far.status_code == 504  # 60 x >= 20 ms > slo_s 0.5 s: refused at once
    assert far.json()["error"]["code"] == "deadline_unreachable"
    assert given.status_code == 200  # its own timeout overrides slo_s
    assert 'stepserve_deadline_refused_total{reason="unreachable"} 1.0' in metrics
    assert 'stepserve_deadline_requests_total{outcome="met"} 2.0' in metrics  # ok, given


def test_load_reports_let_a_process_without_the_model_forecast():
    from stepserve.server.scheduler.load_report import combined_forecast, report

    clock, engine, core = make(max_batch=4)
    warm(core, clock)
    for i in range(4):  # 4 x 4 rows x 20 steps waiting
        core.submit(Request(f"bulk{i}", params(steps=20, n=4), clock.now))
    mine = report(core)
    assert mine["backlog"] == 320 and mine["rows"] == 16 and mine["deadlines"]
    one = combined_forecast([mine], params(steps=4), 0, now=mine["at"])
    assert one.expected == pytest.approx(core.forecast(params(steps=4), clock.now).expected)
    two = combined_forecast([mine, dict(mine, backlog=0, rows=0)], params(steps=4), 0,
                            now=mine["at"])
    assert two.expected < one.expected  # the work spread over two workers
    queued = combined_forecast([mine], params(steps=4), 10, now=mine["at"])
    assert queued.expected > one.expected  # jobs no worker has taken yet count too
    stale = combined_forecast([mine], params(steps=4), 0, now=mine["at"] + 60)
    assert stale is None  # a worker gone quiet is not counted
    assert combined_forecast([dict(mine, deadlines=False)], params(steps=4), 0,
                             now=mine["at"]) is None
