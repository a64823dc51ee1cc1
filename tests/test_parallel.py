"""One request across processes (gloo, 2 CPU processes) and ParaDiGMS: the exact methods
match single-process sampling, ParaDiGMS needs far fewer sequential rounds."""

import numpy as np
import pytest
import torch

from stepserve.loadtests.parallel import run
from stepserve.models.sampling.paradigms import paradigms_sample, paradigms_sample_many
from stepserve.models.sampling.state import init_state, run_to_completion


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.slow  # spawns torch.distributed (gloo) processes
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


@pytest.mark.slow  # ~6 s: every request is also sampled alone
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

        from stepserve.engines.flow_sampling import FlowSampling

        class Counting(FlowSampling):  # the engine's sampling, its forwards counted
            info, encode, decode = engine.info, engine.encode, engine.decode

            def denoise(self, *a):
                calls.append(1)
                return denoise(*a)

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


def _flux_context_parallel(folder: str) -> dict:
    """Runs on both ranks: the transformer's output alone, then context-parallel."""
    from diffusers import FluxTransformer2DModel

    from stepserve.engines import context_parallel

    model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    g = torch.Generator().manual_seed(3)
    h = w = 8
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    inputs = {"hidden_states": torch.randn(2, h * w, 4, generator=g),
              "encoder_hidden_states": torch.randn(2, 8, 32, generator=g),
              "pooled_projections": torch.randn(2, 32, generator=g),
              "timestep": torch.tensor([0.9, 0.3]), "img_ids": ids.reshape(-1, 3),
              "txt_ids": torch.zeros(8, 3), "return_dict": False}
    with torch.inference_mode():
        alone = model(**inputs)[0].clone()
        context_parallel.enable(model, ulysses=2)
        spread = model(**inputs)[0]
    return {"alone": alone, "spread": spread, "type": type(spread).__name__}


@pytest.mark.slow  # spawns torch.distributed (gloo) processes
def test_diffusers_context_parallel_is_exact_on_two_processes(tmp_path):
    from stepserve.engines.distributed import spawn
    from stepserve.models.families.tiny import tiny_flux

    folder = tiny_flux(tmp_path / "flux", seed=0)
    out = spawn(_flux_context_parallel, 2, (str(folder),))
    assert out["type"] == "Tensor"  # the gathered output is waited for, a plain tensor
    assert rel(out["spread"], out["alone"]) <= 1e-4


def test_context_parallel_refuses_models_without_a_plan():
    from diffusers import PixArtTransformer2DModel

    from stepserve.engines import context_parallel

    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8,
                                     in_channels=4, num_layers=1, sample_size=8,
                                     cross_attention_dim=16, caption_channels=16)
    with pytest.raises(ValueError, match="no context-parallel plan"):
        context_parallel.enable(model, ulysses=2)
