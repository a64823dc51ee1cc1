"""One request across processes (gloo, 2 CPU processes) and ParaDiGMS: the exact methods
match single-process sampling, ParaDiGMS needs far fewer sequential rounds."""

import torch

from stepserve.loadtests.parallel import run
from stepserve.models.sampling.paradigms import paradigms_sample
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
    assert rounds * 1.5 <= 32 and rel(out.x, ref) < 5e-3
    exact, rounds1 = paradigms_sample(engine.denoise, state, window=1)
    assert rounds1 == 32 and rel(exact.x, ref) < 1e-5  # window 1 is plain Euler
    torch.testing.assert_close(out.x0, out.x, atol=0.2, rtol=0)  # preview ~ the image
