import numpy as np
import pytest

from stepserve.models.builtin.shapes import (
    BACKGROUNDS,
    PALETTE,
    Scene,
    render,
    sample_scene,
    to_tensor,
    to_uint8,
)


def test_render_is_seeded_and_deterministic():
    a = render([sample_scene(np.random.default_rng(5)) for _ in range(8)])
    b = render([sample_scene(np.random.default_rng(5)) for _ in range(8)])
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_background_and_shape_use_palette_and_differ():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = sample_scene(rng)
        assert s.colour != s.background and s.background in BACKGROUNDS
        img = render([s], 64)[0]
        assert tuple(img[0, 0]) == PALETTE[s.background]
        flat = img.reshape(-1, 3)
        assert (flat == PALETTE[s.colour]).all(1).any(), "solid interior in shape colour"


def test_shape_lies_inside_image_with_border_background():
    rng = np.random.default_rng(1)
    for _ in range(300):
        s = sample_scene(rng, size="large")
        assert s.cx - s.side / 2 >= 0 and s.cx + s.side / 2 <= 1
        assert s.cy - s.side / 2 >= 0 and s.cy + s.side / 2 <= 1


@pytest.mark.parametrize("shape,area", [("square", 1.0), ("circle", np.pi / 4),
                                        ("triangle", 0.5)])
def test_shape_area_matches_geometry(shape, area):
    s = Scene(shape, "red", "white", "large", "center", 0.45, 0.5, 0.5)
    img = render([s], 64)[0].astype(float)
    fg, bg = np.array(PALETTE["red"]), np.array(PALETTE["white"])
    coverage = ((img - bg) / (fg - bg)).mean(-1).sum() / 64**2
    assert coverage == pytest.approx(area * 0.45**2, rel=0.03)


def test_triangle_apex_up():
    s = Scene("triangle", "black", "white", "large", "center", 0.45, 0.5, 0.5)
    dark = render([s], 64)[0].mean(-1) < 128
    rows = dark.sum(1)
    top, bottom = np.nonzero(rows)[0][[0, -1]]
    assert rows[bottom] > 4 * max(rows[top], 1)


def test_position_cell_and_size():
    s = Scene("square", "red", "white", "small", "bottom right", 0.25, 0.75, 0.75)
    ys, xs = np.nonzero((render([s], 64)[0] != PALETTE["white"]).any(-1))
    assert 64 * 0.6 < xs.mean() < 64 * 0.9 and 64 * 0.6 < ys.mean() < 64 * 0.9


def test_invalid_scene_rejected():
    with pytest.raises(ValueError, match="differ"):
        Scene("square", "red", "red", "small", "top", 0.25, 0.5, 0.25)
    with pytest.raises(ValueError, match="shape"):
        Scene("hexagon", "red", "blue", "small", "top", 0.25, 0.5, 0.25)


def test_tensor_round_trip():
    img = render([sample_scene(np.random.default_rng(2)) for _ in range(4)])
    assert np.array_equal(to_uint8(to_tensor(img)), img)
