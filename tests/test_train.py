"""Training is seeded and resumable: a run split in two equals one uninterrupted run."""

import numpy as np
import pytest
import torch

from stepserve.models.builtin.dit import DiTConfig
from stepserve.models.builtin.train import TrainConfig, lr_at, train

TINY = DiTConfig(image_size=16, patch=4, hidden=32, depth=1, heads=2)


def cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch=8, pool_size=64, eval_every=0, warmup=2,
                       checkpoint_every=100, model=TINY)


def test_resume_equals_uninterrupted(tmp_path, encoder):
    whole = train(cfg(4), tmp_path / "a", encoder=encoder)
    train(cfg(2), tmp_path / "b", encoder=encoder)
    resumed = train(cfg(4), tmp_path / "b", encoder=encoder)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    log = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4


def test_training_reduces_loss_and_writes_weights(tmp_path, encoder):
    from stepserve.models.builtin.loading import load_dit

    c = cfg(30)
    c.lr = 3e-3
    train(c, tmp_path / "r", out=tmp_path / "w" / "dit.safetensors", encoder=encoder)
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "r" / "log.jsonl").open()]
    assert sum(losses[-5:]) < sum(losses[:5])
    loaded = load_dit(tmp_path / "w" / "dit.safetensors")
    assert loaded.cfg == TINY
    from stepserve.models.builtin.loading import default_guidance

    assert default_guidance(tmp_path / "w" / "dit.safetensors") == 1.0  # not the 3.0 fallback
    from stepserve.models.builtin.loading import default_noise_scale

    assert default_noise_scale(tmp_path / "w" / "dit.safetensors") == c.noise_scale == 1.0


def test_lr_schedule_warms_up_then_decays():
    c = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(c, 0) < lr_at(c, 9) == 1.0
    assert lr_at(c, 99) < 0.12 and lr_at(c, 50) < 1.0


def _v3(steps: int, init_from: str) -> TrainConfig:
    c = cfg(steps)
    c.model = DiTConfig(image_size=16, patch=4, hidden=32, depth=1, heads=2, refine=8)
    c.init_from, c.captions, c.small_share = init_from, "v3", 0.8
    c.shape_weight, c.edge_weight, c.text_noise = 1.0, 3.0, 0.1
    return c


def _saved_tiny(path):
    """A trained-looking tiny v2-style DiT (non-zero head) written as safetensors."""
    from stepserve.models.builtin.checkpoint import save_module
    from stepserve.models.builtin.dit import DiT

    torch.manual_seed(3)
    dit = DiT(TINY)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_module(dit, path, TINY.to_dict())
    return dit


def test_refine_stage_starts_as_identity_on_a_v2_checkpoint(tmp_path, encoder):
    from stepserve.models.builtin.train import RunState

    old = _saved_tiny(tmp_path / "dit.safetensors")
    state = RunState(_v3(1, str(tmp_path / "dit.safetensors")))
    state.start_from(tmp_path / "dit.safetensors")
    x = torch.randn(3, 3, 16, 16)
    t, d = torch.tensor([0.01, 0.5, 1.0]), torch.zeros(3)
    text = encoder.encode(["a red circle", "a blue square", ""])
    with torch.no_grad():
        assert torch.allclose(state.model(x, t, d, text), old(x, t, d, text), atol=1e-6)
        assert state.model.refiner is not None
        state.model.refiner.net[-1].bias.add_(0.1)  # a trained stage changes the output
        assert not torch.allclose(state.model(x, t, d, text), old(x, t, d, text), atol=1e-3)


def test_start_from_refuses_weights_of_another_model(tmp_path):
    from stepserve.models.builtin.checkpoint import save_module
    from stepserve.models.builtin.dit import DiT
    from stepserve.models.builtin.train import RunState

    other = DiTConfig(image_size=16, patch=4, hidden=64, depth=1, heads=2)
    save_module(DiT(other), tmp_path / "other.safetensors", other.to_dict())
    state = RunState(_v3(1, ""))
    with pytest.raises((ValueError, RuntimeError)):
        state.start_from(tmp_path / "other.safetensors")
    save_module(DiT(DiTConfig(image_size=16, patch=4, hidden=32, depth=2, heads=2)),
                tmp_path / "deeper.safetensors", other.to_dict())
    with pytest.raises(ValueError, match="does not fit"):
        state.start_from(tmp_path / "deeper.safetensors")


def test_second_stage_resumes_as_one_run(tmp_path, encoder):
    init = str(tmp_path / "dit.safetensors")
    _saved_tiny(tmp_path / "dit.safetensors")
    whole = train(_v3(4, init), tmp_path / "a", encoder=encoder)
    train(_v3(2, init), tmp_path / "b", encoder=encoder)
    resumed = train(_v3(4, init), tmp_path / "b", encoder=encoder)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_pixel_weights_favour_the_shape_and_its_edges():
    from stepserve.models.builtin.shapes import render_with_coverage, sample_scene
    from stepserve.models.builtin.train import pixel_weights

    scenes = [sample_scene(np.random.default_rng(i), shape="circle", size="large",
                           position="center") for i in range(2)]
    _, cov = render_with_coverage(scenes, 32)
    cov_t = torch.from_numpy(cov)
    assert pixel_weights(cfg(1), cov_t) is None  # the plain loss (v2)
    c = _v3(1, "")
    w = pixel_weights(c, cov_t)[:, 0]
    assert torch.allclose(w.mean(dim=(1, 2)), torch.ones(2))
    w0, c0 = w[0], cov_t[0]
    inside, outside = w0[c0 == 1].min(), w0[c0 == 0].min()
    edge = w0[(c0 > 0.1) & (c0 < 0.9)].min()
    assert edge > inside > outside and w0[0, 0] == outside


def test_small_share_and_prompt_noise_shape_the_batch(encoder):
    from stepserve.models.builtin.pool import build_pool
    from stepserve.models.builtin.shapes import ATTRIBUTES, VALUES
    from stepserve.models.builtin.train import make_batch, noisy_text

    c = _v3(1, "")
    c.batch, c.pool_size = 256, 200
    pool = build_pool(encoder, c.pool_size, 0, 0.0, grammar="v3")
    small = VALUES["size"].index("small")
    assert 0.3 < float((pool.labels[:, 3] == small).float().mean()) < 0.7  # about half

    def small_share(share: float) -> float:
        """Share of small shapes drawn: bounding side under 0.35 of the 16-px width."""
        c.small_share = share
        cov = torch.cat([make_batch(c, pool, s).coverage for s in range(2)])
        side = (cov > 0.5).any(dim=1).sum(dim=1)
        return float((side < 0.35 * 16).float().mean())

    assert small_share(0.8) > 0.7 and small_share(0.2) < 0.3, (small_share(0.8),
                                                               small_share(0.2))
    assert ATTRIBUTES.index("size") == 3
    text = pool.text(np.arange(4))
    a = noisy_text(text, 0.1, torch.Generator().manual_seed(1), pool.pooled_spread)
    b = noisy_text(text, 0.1, torch.Generator().manual_seed(1), pool.pooled_spread)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, text.mask)
    change = (a.tokens - text.tokens).std() / text.tokens.std()
    assert 0.05 < change < 0.2
    # in the units the model z-scores the pooled vector by: 0.1, not the vector's own
    z_change = ((a.pooled - text.pooled) / pool.pooled_spread).std()
    assert 0.07 < z_change < 0.13
