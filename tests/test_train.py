"""Training is seeded and resumable: a run split in two equals one uninterrupted run."""

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


def test_lr_schedule_warms_up_then_decays():
    c = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(c, 0) < lr_at(c, 9) == 1.0
    assert lr_at(c, 99) < 0.12 and lr_at(c, 50) < 1.0
