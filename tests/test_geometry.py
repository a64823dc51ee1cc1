"""The strict, geometric reading of shapes images (models/builtin/geometry.py): right
on the contract's own renders, still right on lightly noised ones, and wrong where a
person would be unsure too (heavy blur or noise), unlike a lenient reader."""

import numpy as np
import pytest

from stepserve.models.builtin import geometry
from stepserve.models.builtin.shapes import ATTRIBUTES, render, sample_scene


def renders(n, seed, **fixed):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, **fixed) for _ in range(n)]
    labels = np.array([[s.labels()[a] for a in ATTRIBUTES] for s in scenes])
    return render(scenes, 32).astype(np.float32), labels, rng


def blur(x, passes):
    for _ in range(passes):  # 3x3 box blur
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = sum(p[:, dy:dy + 32, dx:dx + 32] for dy in range(3) for dx in range(3)) / 9
    return x


def u8(x):
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def test_ground_truth_renders_read_right():
    images, labels, _ = renders(1000, 3)
    acc = geometry.accuracy(u8(images), labels)
    assert acc["all_five"] >= 99.0, acc


def test_light_noise_still_reads_heavy_blur_or_noise_does_not():
    images, labels, rng = renders(300, 4, size="small")
    light = geometry.accuracy(u8(images + rng.normal(0, 6, images.shape)), labels)
    assert light["all_five"] >= 95.0, light
    for degraded in (blur(images, 4), images + rng.normal(0, 50, images.shape)):
        acc = geometry.accuracy(u8(degraded), labels)
        assert acc["shape"] <= 70.0, acc  # circles and squares blur into each other


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_an_empty_or_other_image_is_unreadable(shape):
    images, labels, _ = renders(1, 5, shape=shape)
    flat = np.full_like(images, 128)
    assert geometry.read(u8(flat))[0][0] == -1  # no shape at all
    wide = u8(images)
    wide[:, 14:18, :, :] = 255 - wide[:, :1, :1, :]  # a bar across the whole image
    assert geometry.read(wide)[0][0] == -1
