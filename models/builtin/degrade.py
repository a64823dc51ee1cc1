"""Deliberately degraded renders of the shapes contract: the strict reader's validation
(blur, noise, jitter, ragged edges), so that it is shown to read what a person reads
and to fail where the shape itself is gone."""

from __future__ import annotations

import dataclasses

import numpy as np

from . import geometry
from .shapes import ATTRIBUTES, Scene, coverage, paint, render, sample_scene


def renders(n: int, seed: int, **fixed: str) -> tuple[list[Scene], np.ndarray]:
    """n scenes (some attributes fixed) and their labels (N, 5)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, **fixed) for _ in range(n)]
    return scenes, np.array([[s.labels()[a] for a in ATTRIBUTES] for s in scenes])


def u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def blur(images: np.ndarray, passes: int) -> np.ndarray:
    """3x3 box blur, `passes` times."""
    x = images.astype(np.float32)
    h, w = x.shape[1:3]
    for _ in range(passes):
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = sum(p[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9
    return u8(x)


def noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return u8(images.astype(np.float32) + rng.normal(0, sigma, images.shape))


def jitter(scenes: list[Scene], pixels: float, scale: float, rng: np.random.Generator,
           resolution: int = 32) -> np.ndarray:
    """Renders with each shape moved up to `pixels` and resized by up to `scale`."""
    out = []
    for s in scenes:
        side = s.side * rng.uniform(1 - scale, 1 + scale)
        half = side / 2
        move = rng.uniform(-pixels, pixels, 2) / resolution
        out.append(dataclasses.replace(
            s, side=side, cx=float(np.clip(s.cx + move[0], half, 1 - half)),
            cy=float(np.clip(s.cy + move[1], half, 1 - half))))
    return render(out, resolution)


def ragged(scenes: list[Scene], p: float, rng: np.random.Generator,
           resolution: int = 32) -> np.ndarray:
    """Renders whose edge pixels flip with chance p: each pixel on either side of the
    outline takes the other side's colour (ragged, hand-drawn edges)."""
    cov = coverage(scenes, resolution) >= 0.5
    padded = np.pad(cov, ((0, 0), (1, 1), (1, 1)), mode="edge")  # no wrap-around
    h, w = cov.shape[1:]
    nb = np.zeros_like(cov)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        nb |= padded[:, dy:dy + h, dx:dx + w] != cov
    flip = nb & (rng.random(cov.shape) < p)
    return paint(scenes, (cov ^ flip).astype(np.float32))


def validation_rows(n: int = 400, seed: int = 4) -> list[tuple[str, dict[str, float]]]:
    """(images, strict accuracy) for ground truth and each degradation, small and large
    shapes apart (small ones are where a reading breaks first)."""
    rng = np.random.default_rng(seed)
    scenes, labels = renders(2 * n, seed - 1)
    rows = [("ground truth, all sizes", geometry.accuracy(render(scenes), labels))]
    for size in ("small", "large"):
        sc, lab = renders(n, seed + (size == "large"), size=size)
        images = render(sc)
        rows += [(f"{size} shapes, {name}", geometry.accuracy(degraded, lab))
                 for name, degraded in _degraded(images, sc, rng)]
    return rows


def _degraded(images: np.ndarray, scenes: list[Scene], rng: np.random.Generator
              ) -> list[tuple[str, np.ndarray]]:
    return [("noise sigma 6", noise(images, 6, rng)),
            ("noise sigma 20", noise(images, 20, rng)),
            ("noise sigma 50", noise(images, 50, rng)),
            ("box blur once", blur(images, 1)),
            ("box blur 4 times", blur(images, 4)),
            ("jitter 1.5 px, size 10%", jitter(scenes, 1.5, 0.1, rng)),
            ("ragged edges 10%", ragged(scenes, 0.1, rng)),
            ("ragged edges 20%", ragged(scenes, 0.2, rng)),
            ("ragged edges 40%", ragged(scenes, 0.4, rng))]


def format_rows(rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = ["| images | strict shape | strict all-five |", "|---|---|---|"]
    lines += [f"| {name} | {acc['shape']:.1f} | {acc['all_five']:.1f} |" for name, acc in rows]
    return "\n".join(lines)
