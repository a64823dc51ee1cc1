"""The strict, geometric reading of shapes images (models/builtin/geometry.py): right
on the contract's own renders, still right on lightly noised, jittered or ragged ones
(a person reads them), and wrong where a person would be unsure too (heavy blur or
noise, heavily ragged tiny shapes), unlike a lenient reader."""

import numpy as np
import pytest

from stepserve.models.builtin import geometry
from stepserve.models.builtin.degrade import blur, jitter, noise, ragged, renders, u8
from stepserve.models.builtin.shapes import render


def test_ground_truth_renders_read_right():
    scenes, labels = renders(1000, 3)
    acc = geometry.accuracy(render(scenes), labels)
    assert acc["all_five"] >= 99.0, acc


def test_light_noise_still_reads_heavy_blur_or_noise_does_not():
    scenes, labels = renders(300, 4, size="small")
    images, rng = render(scenes), np.random.default_rng(0)
    light = geometry.accuracy(noise(images, 6, rng), labels)
    assert light["all_five"] >= 95.0, light
    for degraded in (blur(images, 4), noise(images, 50, rng)):
        acc = geometry.accuracy(degraded, labels)
        assert acc["shape"] <= 70.0, acc  # circles and squares blur into each other


@pytest.mark.parametrize("size", ["small", "large"])
def test_jittered_and_lightly_ragged_shapes_read_heavily_ragged_small_ones_do_not(size):
    scenes, labels = renders(300, 6, size=size)
    rng = np.random.default_rng(1)
    assert geometry.accuracy(jitter(scenes, 1.5, 0.1, rng), labels)["all_five"] >= 97.0
    light = geometry.accuracy(ragged(scenes, 0.1, rng), labels)["shape"]
    heavy = geometry.accuracy(ragged(scenes, 0.4, rng), labels)["shape"]
    assert light >= (80.0 if size == "small" else 95.0)
    assert heavy < light - 15
    if size == "small":
        assert heavy <= 65.0  # an 8-pixel shape with 40% of its edge flipped: a guess


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_an_empty_or_other_image_is_unreadable(shape):
    scenes, _ = renders(1, 5, shape=shape)
    images = render(scenes).astype(np.float32)
    flat = np.full_like(images, 128)
    assert geometry.read(u8(flat))[0][0] == -1  # no shape at all
    wide = u8(images)
    wide[:, 14:18, :, :] = 255 - wide[:, :1, :1, :]  # a bar across the whole image
    assert geometry.read(wide)[0][0] == -1


def test_every_tiny_blob_reads_without_crashing():
    """Specks of a few pixels (every 3x3 pattern) are unreadable or a kind, never an
    error: the reader runs on whatever a model draws."""
    base = np.zeros((32, 32, 3), np.uint8)
    base[:] = (40, 80, 220)
    for code in range(1, 512):
        image = base.copy()
        bits = np.array([(code >> k) & 1 for k in range(9)], bool).reshape(3, 3)
        image[14:17, 14:17][bits] = (220, 40, 40)
        shape = geometry.read(image[None])[0][0]
        assert -1 <= shape <= 2
