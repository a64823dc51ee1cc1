"""The shipped checkpoint: loads from safetensors, the yardstick is trustworthy,
and generated images follow their prompts."""

import numpy as np
import pytest

from stepserve.models.builtin.classifier import accuracy_on_renders, load_classifier
from stepserve.models.builtin.loading import DIT_PATH, load_dit
from stepserve.models.builtin.shapes import render, sample_scene
from stepserve.models.builtin.yardstick import Yardstick, frechet_distance, prompt_set


@pytest.fixture(scope="module")
def stick():
    return Yardstick(load_classifier())


def test_checkpoint_loads_from_safetensors_with_config():
    dit = load_dit()
    assert DIT_PATH.suffix == ".safetensors"
    assert DIT_PATH.stat().st_size < 40 * 2**20
    assert dit.cfg.image_size == 32 and len(dit.blocks) == dit.cfg.depth
    assert float(dit.pooled_std.min()) > 0


def test_classifier_reads_renders_at_98_percent_or_more():
    acc = accuracy_on_renders(load_classifier(), n=2000, seed=777)
    assert min(acc.values()) >= 0.98, acc


def test_yardstick_scores_renders_perfectly_and_noise_badly(stick):
    ps = prompt_set("seen", 64)
    renders = render(list(ps.scenes))
    assert stick.accuracy(renders, ps.labels)["all_five"] >= 95
    noise = np.random.default_rng(0).integers(0, 255, renders.shape, dtype=np.uint8)
    assert stick.accuracy(noise, ps.labels)["all_five"] < 10
    assert stick.fd(renders, ps.scenes) < stick.fd(noise, ps.scenes) / 10


def test_wrong_labels_score_low(stick):
    ps = prompt_set("seen", 64)
    shuffled = render(list(ps.scenes))[::-1]
    assert stick.accuracy(shuffled, ps.labels)["all_five"] < 20


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    assert frechet_distance(a, b) < 0.5
    assert frechet_distance(a, b + 2) > 8 * 4 * 0.9


def test_prompt_sets_are_fixed_and_distinct():
    assert prompt_set("seen", 8) == prompt_set("seen", 8)
    assert set(prompt_set("seen", 50).prompts).isdisjoint(prompt_set("unseen", 50).prompts)


def test_quality_smoke_four_steps(generate, stick):
    """32 prompts at 4 steps: the generated images follow their prompts."""
    ps = prompt_set("seen", 32)
    images = generate(ps.prompts, ps.seeds, steps=4)
    acc = stick.accuracy(images, ps.labels)
    assert acc["all_five"] >= 60, acc


def test_the_model_card_noise_scale_is_served_and_measured(engine, generate):
    """The shipped dit.json declares v3's sampling noise scale (0.8, docs/builtin-eval.md);
    the engine samples with it, and unscaled noise draws different images."""
    from dataclasses import replace

    from stepserve.models.builtin.loading import default_noise_scale
    from stepserve.server.result_cache import result_key
    from stepserve.server.scheduler.request import GenerationParams

    assert default_noise_scale() == engine.info.noise_scale == 0.8
    prompt = ["a small red circle in the top left"]
    scaled = generate(prompt, [5], steps=4)
    info = engine.info
    try:
        engine.info = replace(info, noise_scale=1.0)
        unit = generate(prompt, [5], steps=4)
        params = GenerationParams(prompt[0], 4, 5, 1.0)
        assert result_key(engine.info, params) != result_key(info, params)
    finally:
        engine.info = info
    assert np.abs(scaled.astype(int) - unit.astype(int)).max() > 16


def test_generation_is_seeded(generate):
    prompt = ["a big blue square at the right on a yellow background"]
    a, b, c = (generate(prompt, [seed], steps=2) for seed in (3, 3, 4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sample_scene_fixed_attributes():
    s = sample_scene(np.random.default_rng(0), shape="circle", colour="red", size="small")
    assert (s.shape, s.colour, s.size) == ("circle", "red", "small")
