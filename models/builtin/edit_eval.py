"""Edit quality of the built-in model: recolour and inpaint, read by the yardstick
(`stepserve eval --edits`, `stepserve bench edits`).

recolour: a rendered source and the canonical prompt of the same scene with another
shape colour: the edit succeeds when the yardstick reads the new colour with the
shape, size and position of the source ("kept").
inpaint: a source with a shape in one cell, a mask over another (empty) cell and the
prompt of a small shape of a new colour there: every pixel outside the mask must come
back unchanged, and the new colour must cover part of the masked cell.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..sampling.edit import Edit
from .captions import canonical_caption
from .shapes import ATTRIBUTES, COLOURS, PALETTE, POSITIONS, render, sample_scene
from .yardstick import Yardstick

# generate(prompts, seeds, steps, edits=[...]) -> uint8 images (N, H, W, 3)
GenerateEdits = Callable[..., np.ndarray]


SEED = 4040


def recolour_cases(n: int, seed: int = SEED) -> tuple[list, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    sources, prompts, labels = [], [], []
    for _ in range(n):
        scene = sample_scene(rng)
        new = [c for c in COLOURS if c not in (scene.colour, scene.background)]
        target = replace(scene, colour=new[rng.integers(len(new))])
        sources.append(render([scene])[0])
        prompts.append(canonical_caption(target))
        labels.append([target.labels()[a] for a in ATTRIBUTES])
    return sources, prompts, np.array(labels)


def cell_mask(position: str, size: int = 32) -> np.ndarray:
    row, col = divmod(POSITIONS.index(position), 3)
    mask = np.zeros((size, size), bool)
    lo = lambda k: round(k * size / 3)  # noqa: E731
    mask[lo(row):lo(row + 1), lo(col):lo(col + 1)] = True
    return mask


def inpaint_cases(n: int, seed: int = SEED + 1) -> list[tuple[np.ndarray, np.ndarray, str,
                                                             str]]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        scene = sample_scene(rng, size="small")
        others = [p for p in POSITIONS if p != scene.position]
        where = others[rng.integers(len(others))]
        colours = [c for c in COLOURS if c not in (scene.colour, scene.background)]
        colour = colours[rng.integers(len(colours))]
        new = sample_scene(rng, size="small", position=where, colour=colour,
                           background=scene.background)
        cases.append((render([scene])[0], cell_mask(where), canonical_caption(new), colour))
    return cases


def recolour_rows(generate: GenerateEdits, stick: Yardstick, n: int,
                  strengths: list[float], steps_list: list[int]) -> list[dict]:
    sources, prompts, labels = recolour_cases(n)
    rows = []
    for steps in steps_list:
        for strength in strengths:
            start = time.perf_counter()
            images = generate(prompts, [SEED + i for i in range(n)], steps,
                              edits=[Edit(s, strength) for s in sources])
            seconds = time.perf_counter() - start
            pred, _ = stick.read(images)
            hit = pred == labels
            colour = hit[:, ATTRIBUTES.index("colour")]
            kept = hit[:, [ATTRIBUTES.index(a) for a in ("shape", "size", "position")]]
            rows.append({"task": "recolour", "steps": steps, "strength": strength,
                         "new_colour": 100 * float(colour.mean()),
                         "position_kept": 100 * float(hit[:, 4].mean()),
                         "recoloured_and_kept": 100 * float((colour & kept.all(1)).mean()),
                         "images_per_s": n / seconds})
    return rows


def inpaint_rows(generate: GenerateEdits, n: int, strengths: list[float],
                 steps_list: list[int]) -> list[dict]:
    cases = inpaint_cases(n)
    rows = []
    for steps in steps_list:
        for strength in strengths:
            images = generate([c[2] for c in cases], [SEED + i for i in range(n)], steps,
                              edits=[Edit(src, strength, mask) for src, mask, _, _ in cases])
            unchanged, coloured = [], []
            for img, (src, mask, _, colour) in zip(images, cases):
                unchanged.append(bool(np.array_equal(img[~mask], src[~mask])))
                dist = np.abs(img[mask].astype(int) - np.array(PALETTE[colour])).sum(1)
                coloured.append(float((dist < 90).mean()) >= 0.2)
            rows.append({"task": "inpaint", "steps": steps, "strength": strength,
                         "outside_unchanged": 100 * float(np.mean(unchanged)),
                         "new_colour_inside": 100 * float(np.mean(coloured))})
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(
            f"{r[k]:g}" if k in ("strength", "cost_x") else
            f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)
