from dataclasses import replace

import numpy as np
import pytest
import torch

from stepserve.models.builtin.dit import DiT, DiTConfig
from stepserve.models.builtin.text import TextBatch
from stepserve.models.sampling.flow import apply_guidance, euler_step, predict_x0
from stepserve.models.sampling.qsched import QSched
from stepserve.models.sampling.schedules import flow_timesteps, shift_time
from stepserve.models.sampling.state import (
    advance,
    init_state,
    run_to_completion,
    step_batch,
)

CFG = DiTConfig(image_size=16, patch=4, hidden=64, depth=2, heads=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DiT(CFG).eval()
    # adaLN-Zero starts as the identity; randomise so the test exercises every path.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def denoiser(model):
    @torch.inference_mode()
    def run(x, t, d, text):
        return model(x, t, d, text)

    return run


def text(seed: int, length: int) -> TextBatch:
    g = torch.Generator().manual_seed(seed)
    return TextBatch(torch.randn(1, length, 384, generator=g),
                     torch.ones(1, length, dtype=torch.bool), torch.randn(1, 384, generator=g))


def state(seed, steps, guidance=3.0, length=7, sampler="euler"):
    return init_state(seed, steps, text(seed, length), text(999, 2), shape=(3, 16, 16),
                      guidance=guidance, sampler=sampler, time_shift=3.0)


def test_timesteps_shift_toward_noise():
    ts = flow_timesteps(4, 3.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and len(ts) == 5
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert ts[2] == pytest.approx(shift_time(0.5, 3.0)) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        flow_timesteps(0)


def test_step_functions_are_consistent():
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([0.8, 0.3])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    v = noise - x0
    assert torch.allclose(predict_x0(x_t, v, t), x0, atol=1e-6)
    assert torch.allclose(euler_step(x_t, v, t, torch.zeros(2)), x0, atol=1e-6)
    vc, vu = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    g = apply_guidance(vc, vu, torch.tensor([1.0, 3.0]))
    assert g[0].eq(1).all() and g[1].eq(3).all()


def test_same_seed_same_image_and_different_seed_differs(model):
    a = run_to_completion(denoiser(model), [state(1, 4)])[0].x
    b = run_to_completion(denoiser(model), [state(1, 4)])[0].x
    c = run_to_completion(denoiser(model), [state(2, 4)])[0].x
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_mixed_batch_equals_running_each_alone(model):
    """Requests at different steps, step counts, guidance and prompt lengths share a batch."""
    specs = [(10, 1, 1.0, 3), (11, 4, 3.0, 9), (12, 8, 5.0, 5), (13, 2, 2.0, 12),
             (14, 16, 1.0, 7)]
    alone = [run_to_completion(denoiser(model), [state(s, n, g, L)])[0].x
             for s, n, g, L in specs]
    states = [state(s, n, g, L) for s, n, g, L in specs]
    # stagger: advance some requests first so that the shared batch mixes steps
    states[2] = step_batch(denoiser(model), [states[2]])[0]
    states[4] = step_batch(denoiser(model), [states[4]])[0]
    states[4] = step_batch(denoiser(model), [states[4]])[0]
    mixed = run_to_completion(denoiser(model), states, max_batch=4)
    for a, m in zip(alone, mixed):
        assert m.done
        assert torch.allclose(a, m.x, atol=1e-4), (a - m.x).abs().max()


def test_guidance_changes_output_and_scale_one_skips_uncond(model):
    calls = []

    def counting(x, t, d, txt):
        calls.append(x.shape[0])
        return model(x, t, d, txt)

    with torch.inference_mode():
        step_batch(counting, [state(1, 4, 1.0), state(2, 4, 3.0)])
    assert calls == [3], "one forward: two cond rows + one uncond row"
    a = run_to_completion(denoiser(model), [state(3, 4, 1.0)])[0].x
    b = run_to_completion(denoiser(model), [state(3, 4, 4.0)])[0].x
    assert not torch.allclose(a, b)


def test_preview_is_x0_prediction_and_final_step_reaches_t0(model):
    s = run_to_completion(denoiser(model), [state(5, 3)])[0]
    assert s.done and s.step == 3 and s.x0 is not None
    # On the last step t_next = 0, so the Euler result equals the x0 prediction.
    assert torch.allclose(s.x, s.x0, atol=1e-5)


def test_state_validation():
    with pytest.raises(ValueError, match="sampler"):
        state(1, 4, sampler="ddim")
    s = run_to_completion(lambda x, t, d, txt: torch.zeros_like(x), [state(1, 2)])[0]
    with pytest.raises(ValueError, match="finished"):
        step_batch(lambda x, t, d, txt: torch.zeros_like(x), [s])


def test_noise_scale_scales_text_to_image_noise_but_not_an_edits_source_noise():
    from stepserve.models.sampling.edit import Edit

    a = init_state(1, 4, text(1, 3), text(2, 2), shape=(3, 16, 16))
    b = init_state(1, 4, text(1, 3), text(2, 2), shape=(3, 16, 16), noise_scale=0.8)
    assert torch.allclose(b.x, 0.8 * a.x) and b.t == a.t
    image = np.zeros((16, 16, 3), np.uint8)
    edits = [init_state(1, 4, text(1, 3), text(2, 2), shape=(3, 16, 16), noise_scale=s,
                        edit=Edit(image, strength=0.5)) for s in (1.0, 0.8)]
    assert torch.equal(edits[0].x, edits[1].x)  # the source noised as in training


def test_shortcut_step_size_and_flow_euler(model):
    s = state(1, 4)
    assert s.d == pytest.approx(s.t - s.t_next)
    assert state(1, 4, sampler="flow-euler").d == 0.0


def test_qsched_ramps_to_one_and_scales_output_and_sample(model):
    q = QSched(model=1.1, sample=0.9)
    assert q.at(0, 4) == (1.1, 0.9)
    assert q.at(3, 4) == (1.0, 1.0)
    assert q.at(1, 3) == pytest.approx((1.05, 0.95))
    assert init_state(1, 4, text(1, 3), text(2, 2), shape=(3, 16, 16),
                      qsched=QSched()).qsched is None  # identity costs nothing
    plain = state(5, 4, guidance=1.0)
    corrected = replace(plain, qsched=q)
    v = torch.randn(3, 16, 16)
    a, b = advance(plain, v), advance(corrected, v)
    t, t_next = plain.t, plain.t_next
    assert torch.allclose(b.x, 0.9 * plain.x + (t_next - t) * 1.1 * v, atol=1e-6)
    assert not torch.allclose(a.x, b.x)
    # a mixed batch of corrected and plain requests equals each run alone
    together = run_to_completion(denoiser(model), [plain, corrected])
    alone = [run_to_completion(denoiser(model), [s])[0] for s in (plain, corrected)]
    for x, y in zip(together, alone):
        assert torch.allclose(x.x, y.x, atol=1e-5)
