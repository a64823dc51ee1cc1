"""One request across processes (gloo, 2 CPU processes) and ParaDiGMS: the exact methods
match single-process sampling, ParaDiGMS needs far fewer sequential rounds."""

import numpy as np
import torch

from stepserve.loadtests.parallel import run
from stepserve.models.sampling.paradigms import paradigms_sample, paradigms_sample_many
from stepserve.models.sampling.state import init_state, run_to_completion


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_cfg_and_sequence_parallel_are_exact():
    base = run("sequential", 1, 4, 3.0, 5, 0)
    for mode in ("cfg", "sequence"):
        out = run(mode, 2, 4, 3.0, 5, 0)
        assert rel(out["x"], base["x"]) <= 1e-4, mode


def test_paradigms_takes_fewer_rounds_and_matches(engine):
    info = engine.info
    cond, uncond = engine.encode(["a large blue square on a yellow background"]), \
        engine.encode([""])
    state = init_state(3, 32, cond, uncond, shape=info.image_shape, guidance=1.0,
                       time_shift=info.time_shift)
    ref = run_to_completion(engine.denoise, [state])[0].x
    out, rounds = paradigms_sample(engine.denoise, state, window=16, tol=1e-3)
    assert rounds * 1.5 <= 32 and rel(out.x, ref) < 2e-2  # ~1-2 grey levels
    exact, rounds1 = paradigms_sample(engine.denoise, state, window=1)
    assert rounds1 == 32 and rel(exact.x, ref) < 1e-5  # window 1 is plain Euler
    torch.testing.assert_close(out.x0, out.x, atol=0.2, rtol=0)  # preview ~ the image


def test_paradigms_for_several_requests_shares_forwards_and_matches_each_alone(engine):
    info = engine.info
    prompts = ["a large blue square on a yellow background", "a small red circle",
               "a tiny green triangle at the top left"]
    cond, uncond = engine.encode(prompts), engine.encode([""])
    states = [init_state(7 + i, 16 * (1 + i % 2), cond.select([i]), uncond,
                         shape=info.image_shape, guidance=1.0 + i, time_shift=info.time_shift)
              for i in range(3)]  # different steps and guidance in one batch
    calls = []

    def counting(x, *args):
        calls.append(x.shape[0])
        return engine.denoise(x, *args)

    many, rounds = paradigms_sample_many(counting, states, window=8, tol=1e-3)
    assert len(calls) == max(rounds) and max(calls) > 8  # windows of all three per forward
    for state, got, r in zip(states, many, rounds):
        alone, r1 = paradigms_sample(engine.denoise, state, window=8, tol=1e-3)
        assert abs(r - r1) <= 1 and rel(got.x, alone.x) < 1e-3


def test_latency_mode_uses_picard_rounds_only_while_alone(engine):
    from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore
    from stepserve.server.scheduler.events import Completed
    from stepserve.server.scheduler.request import GenerationParams, Request

    prompt = "a small green triangle in the center on a black background"

    def run_core(mode, join_after=None):
        calls = []
        denoise = engine.denoise

        class Counting:
            info, encode, decode = engine.info, engine.encode, engine.decode
            samplers, default_sampler = engine.samplers, engine.default_sampler
            needs_forward = staticmethod(engine.needs_forward)
            init_state = engine.init_state
            picard_init = engine.picard_init

            def denoise(self, *a):
                calls.append(1)
                return denoise(*a)

            def step_batch(self, states):
                from stepserve.models.sampling.state import step_batch
                return step_batch(self.denoise, states)

            def picard_round(self, p):
                from stepserve.models.sampling.paradigms import picard_round
                return picard_round(self.denoise, p)

        core = SchedulerCore(Counting(), SchedulerConfig(max_batch_size=16))
        core.submit(Request("a", GenerationParams(prompt, 24, 5, 1.0, mode=mode,
                                                  partial_images=2), 0.0))
        images, previews, it = {}, 0, 0
        while core.has_work:
            if join_after is not None and it == join_after:
                core.submit(Request("b", GenerationParams(prompt, 4, 6, 1.0), 1.0))
            for e in core.step():
                previews += type(e).__name__ == "Preview"
                if isinstance(e, Completed):
                    images[e.request_id] = e.images[0].astype(float)
            it += 1
        return images, len(calls), previews

    seq, seq_forwards, _ = run_core("throughput")
    fast, fast_forwards, previews = run_core("latency")
    assert seq_forwards == 24 and fast_forwards * 1.5 <= 24 and previews == 2
    assert np.abs(fast["a"] - seq["a"]).max() <= 3
    mixed, _, _ = run_core("latency", join_after=2)  # someone arrives: back to steps
    assert set(mixed) == {"a", "b"} and np.abs(mixed["a"] - seq["a"]).max() <= 3
