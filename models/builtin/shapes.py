"""Renderer for the "shapes" dataset (the contract: docs/shapes-dataset.md).

Anti-aliasing is done by supersampling the inside test on a finer grid and
averaging, vectorised over a whole batch, so training never waits on data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
BACKGROUNDS = COLOURS + ("gray",)
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
ATTRIBUTES = ("shape", "colour", "background", "size", "position")
VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "background": BACKGROUNDS,
    "size": SIZES,
    "position": POSITIONS,
}
SIZE_FRACTION = {"small": 0.25, "large": 0.45}
CELL_CENTRES = (0.25, 0.5, 0.75)
JITTER = 0.03
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """One image's content: the five attributes plus continuous geometry."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    side: float  # bounding-box side, fraction of width
    cx: float  # bounding-box centre, fraction of width
    cy: float

    def __post_init__(self) -> None:
        values = dataclasses.asdict(self)
        for attr in ATTRIBUTES:
            if values[attr] not in VALUES[attr]:
                raise ValueError(f"{attr}={values[attr]!r} not in {VALUES[attr]}")
        if self.colour == self.background:
            raise ValueError("shape colour must differ from background")

    def labels(self) -> dict[str, int]:
        values = dataclasses.asdict(self)
        return {a: VALUES[a].index(values[a]) for a in ATTRIBUTES}


def sample_scene(rng: np.random.Generator, **fixed: str) -> Scene:
    """Draw attributes uniformly (unless fixed) and jitter the geometry."""
    shape = fixed.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    colour = fixed.get("colour") or COLOURS[rng.integers(len(COLOURS))]
    background = fixed.get("background")
    if background is None:
        choices = [b for b in BACKGROUNDS if b != colour]
        background = choices[rng.integers(len(choices))]
    size = fixed.get("size") or SIZES[rng.integers(len(SIZES))]
    position = fixed.get("position") or POSITIONS[rng.integers(len(POSITIONS))]
    side = SIZE_FRACTION[size] + rng.uniform(-JITTER, JITTER)
    row, col = divmod(POSITIONS.index(position), 3)
    half = side / 2
    # Jitter, then clamp so the shape lies wholly inside the image.
    cx = float(np.clip(CELL_CENTRES[col] + rng.uniform(-JITTER, JITTER), half, 1 - half))
    cy = float(np.clip(CELL_CENTRES[row] + rng.uniform(-JITTER, JITTER), half, 1 - half))
    return Scene(shape, colour, background, size, position, float(side), cx, cy)


def coverage(scenes: list[Scene], resolution: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, shape (N, H, W)."""
    n = resolution * SUPERSAMPLE
    grid = (np.arange(n, dtype=np.float32) + 0.5) / n
    x = grid[None, None, :]
    y = grid[None, :, None]
    side = np.array([s.side for s in scenes], np.float32)[:, None, None]
    cx = np.array([s.cx for s in scenes], np.float32)[:, None, None]
    cy = np.array([s.cy for s in scenes], np.float32)[:, None, None]
    half = side / 2
    dx, dy = x - cx, y - cy
    circle = dx**2 + dy**2 <= half**2
    square = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Isosceles, apex up: half-width grows linearly from 0 at the top to side/2 at the base.
    triangle = (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    kind = np.array([SHAPES.index(s.shape) for s in scenes])[:, None, None]
    inside = np.where(kind == 0, circle, np.where(kind == 1, square, triangle))
    cov = inside.reshape(len(scenes), resolution, SUPERSAMPLE, resolution, SUPERSAMPLE)
    return cov.mean(axis=(2, 4), dtype=np.float32)


def render(scenes: list[Scene], resolution: int = 32) -> np.ndarray:
    """Render scenes to uint8 RGB images, shape (N, H, W, 3)."""
    return render_with_coverage(scenes, resolution)[0]


def render_with_coverage(scenes: list[Scene], resolution: int = 32
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The images and each pixel's shape coverage (N, H, W) in 0..1 (training weights
    the shape and its edges by it)."""
    cov = coverage(scenes, resolution)
    return paint(scenes, cov), cov


def paint(scenes: list[Scene], cov: np.ndarray) -> np.ndarray:
    """uint8 images from each pixel's shape coverage (N, H, W): the scene's background
    blended toward its shape's colour."""
    fg = np.array([PALETTE[s.colour] for s in scenes], np.float32)[:, None, None, :]
    bg = np.array([PALETTE[s.background] for s in scenes], np.float32)[:, None, None, :]
    img = bg + (fg - bg) * cov[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the model's pixel space."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
