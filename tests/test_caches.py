"""Step caches inside step-level batching: AB-Cache maths, schedules, batch slots, API."""

import numpy as np
import pytest
import torch

from fakes import FakeEngine
from fakes import drain_with_stats as drain
from stepserve.models.caches import ab_cache
from stepserve.models.caches.block_cache import RowCache, cached_forward
from stepserve.models.caches.config import CacheConfig, CacheConfigError
from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore
from stepserve.server.scheduler.events import Completed, Preview
from stepserve.server.scheduler.request import GenerationParams, Request


def test_lagrange_weights_are_adams_bashforth_for_equal_steps():
    assert ab_cache.lagrange_weights((0.5, 0.75), 0.25) == pytest.approx([2, -1])
    assert ab_cache.lagrange_weights((0.5, 0.75, 1.0), 0.25) == pytest.approx([3, -3, 1])


def test_extrapolation_is_exact_for_polynomials_on_unequal_steps():
    times = (0.41, 0.63, 0.97)  # newest first, unequal gaps (shifted schedules)
    f = lambda t: torch.tensor([1.0 + 2.0 * t - 3.0 * t * t])  # noqa: E731
    state = ab_cache.ABState(times, tuple(f(t) for t in times))
    assert torch.allclose(ab_cache.predict(state, 0.2, 3), f(0.2), atol=1e-5)
    linear = ab_cache.ABState(times[:2], tuple(f(t) - f(t) + 5 * t for t in times[:2]))
    assert torch.allclose(ab_cache.predict(linear, 0.1, 2), torch.tensor([0.5]), atol=1e-6)
    # the adaptive error estimate vanishes when the lower order already agrees
    const = ab_cache.ABState(times, (torch.ones(1),) * 3)
    assert ab_cache.error_estimate(const, 0.2, 3) < 1e-6


def compute_pattern(cfg, steps):
    state, pattern = ab_cache.ABState(), []
    for step in range(steps):
        t = 1 - step / steps
        if ab_cache.must_compute(cfg, state, step, steps, t):
            state = ab_cache.record(state, t, torch.ones(1), cfg.order)
            pattern.append(1)
        else:
            state = ab_cache.skipped(state)
            pattern.append(0)
    return pattern


def test_fixed_interval_schedule_keeps_first_and_last_and_caps_skips():
    assert compute_pattern(CacheConfig("ab-cache", interval=2), 8) == [1, 0, 1, 0, 1, 0, 1, 1]
    p = compute_pattern(CacheConfig("ab-cache", interval=3, max_skips=2), 16)
    assert p[0] == p[-1] == 1 and sum(p) == 6  # 16 steps -> 6 forwards: 2.67x less compute
    p = compute_pattern(CacheConfig("ab-cache", interval=8, max_skips=2), 16)
    assert "000" not in "".join(map(str, p))
    assert compute_pattern(CacheConfig("ab-cache", interval=2), 1) == [1]


def test_config_parsing_and_errors_name_the_knob():
    assert CacheConfig.parse(None).policy == "none"
    assert CacheConfig.parse("ab-cache").order == 2
    assert CacheConfig.parse({"policy": "ab-cache", "order": 3}).order == 3
    for value, field in [("bogus", "policy"), ({"policy": "ab-cache", "order": 5}, "order"),
                         ({"policy": "ab-cache", "speed": 1}, "speed"),
                         ("fastcache", "policy"), ({"policy": "teacache", "warmup": 0}, "warmup")]:
        with pytest.raises(CacheConfigError) as err:
            CacheConfig.parse(value)
        assert err.value.field == field


def cached_request(rid, steps, cache=None, partial=0):
    return Request(rid, GenerationParams("p", steps, seed=1, guidance=1.0, cache=cache,
                                         partial_images=partial), 0.0)


def test_skipping_requests_take_no_batch_slot_and_are_counted():
    engine = FakeEngine()
    core = SchedulerCore(engine, SchedulerConfig(max_batch_size=8))
    cache = CacheConfig("ab-cache", interval=3)
    core.submit(cached_request("cached", 16, cache, partial=3))
    core.submit(cached_request("plain", 16))
    events, stats = drain(core)
    assert {e.request_id for e in events if isinstance(e, Completed)} == {"cached", "plain"}
    assert len([e for e in events if isinstance(e, Preview)]) == 3  # previews still on time
    assert sum(engine.batches) == 6 + 16  # cached: 6 forwards; plain: all 16
    assert sum(s.skipped.get("ab-cache", 0) for s in stats) == 10
    assert all(b in (1, 2) for b in engine.batches)


def test_cached_images_stay_close_and_extrapolation_beats_plain_reuse(generate):
    prompts = ["a small red circle in the top left on a white background",
               "a large blue square at the bottom right on a yellow background"]
    seeds = [3, 4]
    ref = generate(prompts, seeds, steps=16).astype(float)

    def err(cfg):
        from stepserve.server.scheduler.offline import generate_offline

        out = generate_offline(generate.args[0], prompts, seeds, 16, cache=cfg).astype(float)
        return float(((out - ref) ** 2).sum() ** 0.5 / (ref ** 2).sum() ** 0.5)

    reuse = err(CacheConfig("ab-cache", order=1, interval=2))
    ab2 = err(CacheConfig("ab-cache", order=2, interval=2))
    assert 0 < ab2 < reuse
    assert ab2 < 0.05


def row(policy, state=None, step=1, steps=16, **knobs):
    cfg = CacheConfig(policy, **knobs)
    return RowCache(cfg, state or cfg.new_row_state(), step, steps)


def test_block_caches_are_exact_when_nothing_changes_and_skip_blocks(engine):
    dit = engine.dit
    gen = torch.Generator().manual_seed(0)
    text = engine.encode(["a small red circle in the top left on a white background",
                          "a large blue square on a yellow background"])
    x, t, d = torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([0.7, 0.4]), torch.zeros(2)
    with torch.inference_mode():
        full = dit(x, t, d, text)
    plain, states = cached_forward(dit, x, t, d, text, [None, None])
    assert torch.allclose(plain, full, atol=1e-5) and states == [None, None]
    depth = len(dit.blocks)
    for policy, skipped in [("first-blocks", depth - 1), ("teacache", depth)]:
        # step 0 is forced (warm-up): computed in full, caches filled
        out0, st0 = cached_forward(dit, x, t, d, text, [row(policy, step=0), None])
        assert torch.allclose(out0, full, atol=1e-5)
        # the same input again: the test passes, blocks are reused, output unchanged
        out1, st1 = cached_forward(dit, x, t, d, text, [row(policy, st0[0]), None])
        assert st1[0].skipped_blocks == skipped and st1[1] is None
        assert torch.allclose(out1, full, atol=1e-4)
        # a forced step (the last one) never skips
        _, st2 = cached_forward(dit, x, t, d, text, [row(policy, st0[0], step=15), None])
        assert st2[0].skipped_blocks == 0
        # a big change in the input fails the test: computed in full
        _, st3 = cached_forward(dit, -x, t.flip(0), d, text, [row(policy, st0[0]), None])
        assert st3[0].skipped_blocks == 0


def test_block_caches_through_the_scheduler_stay_close(generate):
    from stepserve.server.scheduler.offline import generate_offline

    prompts = ["a small red circle in the top left on a white background",
               "a large blue square at the bottom right on a yellow background"]
    ref = generate(prompts, [3, 4], steps=16).astype(float)
    for policy in ("first-blocks", "teacache"):
        out = generate_offline(generate.args[0], prompts, [3, 4], 16,
                               cache=CacheConfig(policy, block_threshold=0.1)).astype(float)
        assert float(((out - ref) ** 2).sum() ** 0.5 / (ref ** 2).sum() ** 0.5) < 0.1, policy


def test_lazydit_gates_train_and_reuse_modules(engine):
    from stepserve.models.caches.lazydit_train import GateTrainConfig, train_gates

    dit = engine.dit
    cfg = GateTrainConfig(steps=3, batch=4, prompts=2, step_counts=(3,), penalty=0.5)
    gates, meta = train_gates(dit, engine, cfg)
    assert meta["pairs"] == 2 * 2 and meta["log"]
    assert all(np.isfinite(r["rel_mse"]) for r in meta["log"])
    assert not any(p.requires_grad for p in dit.parameters())  # base frozen
    text = engine.encode(["a small red circle in the top left on a white background"] * 2)
    gen = torch.Generator().manual_seed(0)
    x, t, d = torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([0.7, 0.7]), torch.zeros(2)
    with torch.inference_mode():
        full = dit(x, t, d, text)
    _, st0 = cached_forward(dit, x, t, d, text, [row("lazydit", step=0)] * 2, gates)
    # threshold 0: every allowed module is reused; the same input gives the same output
    rows = [row("lazydit", st0[0], gate_threshold=0.0), None]
    out, st1 = cached_forward(dit, x, t, d, text, rows, gates)
    assert st1[0].skipped_blocks == len(dit.blocks) and st1[1] is None
    assert torch.allclose(out, full, atol=1e-4)
    # threshold 1: nothing is reused
    out, st2 = cached_forward(dit, x, t, d, text, [row("lazydit", st0[0], gate_threshold=1.0),
                                                   None], gates)
    assert st2[0].skipped_blocks == 0 and torch.allclose(out, full, atol=1e-4)


def test_cache_benchmark_counts_the_compute_it_saves(engine):
    from stepserve.loadtests.caches import POLICIES, CountingEngine, quality_rows
    from stepserve.models.builtin.yardstick import Yardstick

    class Recording(CountingEngine):
        """Keeps every run's block-row count: quality_rows resets `rows` to 0 per policy."""

        def __init__(self, engine):
            self.runs = []
            super().__init__(engine)

        @property
        def rows(self):
            return self.runs[-1]

        @rows.setter
        def rows(self, value):
            if value == 0:
                self.runs.append(0)
            else:
                self.runs[-1] = value

    counting = Recording(engine)
    policies = {k: POLICIES[k] for k in ("none", "ab-cache k=2 every 3", "first-blocks 0.15")}
    prompts, steps = 4, 8
    rows = quality_rows(counting, Yardstick(), [steps], prompts, policies)
    base, ab, fb = counting.runs[1:]  # runs[0]: the count CountingEngine starts with
    depth = len(engine.dit.blocks)
    lanes = prompts * (2 if engine.info.default_guidance != 1.0 else 1)  # cond + uncond rows
    # no cache: every step runs every block on every row
    assert base == lanes * steps * depth
    # ab-cache every 3 of 8 steps computes steps 0, 3, 6 and the last one, 7: whole forwards
    assert ab == lanes * 4 * depth
    # first-blocks forces step 0 and the last step; a reused step still runs the first block
    skipped = base - fb
    assert 0 < skipped <= lanes * (steps - 2) * (depth - 1) and skipped % (depth - 1) == 0
    saved = {r["policy"]: r["compute_saved_x"] for r in rows}
    assert saved == {"none": 1.0, "ab-cache k=2 every 3": base / ab,
                     "first-blocks 0.15": base / fb}


def test_policies_own_their_options_and_results_are_keyed_by_policy():
    from stepserve.engines.base import EngineInfo
    from stepserve.models.caches.config import ForwardCache, StepCache
    from stepserve.server.result_cache import result_key

    ab, tea = CacheConfig("ab-cache", interval=3), CacheConfig("teacache")
    assert isinstance(ab, StepCache) and isinstance(tea, ForwardCache)
    assert (ab.policy, ab.interval, tea.policy) == ("ab-cache", 3, "teacache")
    with pytest.raises(CacheConfigError) as err:  # a knob of another policy
        CacheConfig("teacache", interval=3)
    assert err.value.field == "interval"
    info = EngineInfo("torch", "m", "fp32", "cpu", (3, 4, 4), 1.0, 1.0)
    keys = {result_key(info, GenerationParams("p", 8, 1, 1.0, cache=c))
            for c in (None, CacheConfig("lazydit"), CacheConfig("teacache"),
                      CacheConfig("ab-cache"), CacheConfig("ab-cache", order=3))}
    assert len(keys) == 5
