"""Edit quality on the built-in model: recolour and inpaint, read by the yardstick.

    stepserve bench edits --n 100 --strengths 0.5,0.75,0.9 --steps 4,8

recolour: a rendered source and the canonical prompt of the same scene with another
shape colour: the edit succeeds when the yardstick reads the new colour with the
shape, size and position of the source ("kept").
inpaint: a source with a shape in one cell, a mask over another (empty) cell and the
prompt of a small shape of a new colour there: every pixel outside the mask must come
back unchanged, and the new colour must cover part of the masked cell.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from stepserve.engines.torch_engine import TorchEngine
from stepserve.models.builtin.captions import canonical_caption
from stepserve.models.builtin.shapes import (
    ATTRIBUTES,
    COLOURS,
    PALETTE,
    POSITIONS,
    render,
    sample_scene,
)
from stepserve.models.builtin.yardstick import Yardstick
from stepserve.models.sampling.edit import Edit
from stepserve.server.scheduler.offline import generate_offline

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


def recolour_rows(engine: TorchEngine, stick: Yardstick, n: int, strengths: list[float],
                  steps_list: list[int]) -> list[dict]:
    sources, prompts, labels = recolour_cases(n)
    rows = []
    for steps in steps_list:
        for strength in strengths:
            start = time.perf_counter()
            images = generate_offline(engine, prompts, [SEED + i for i in range(n)], steps,
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


def inpaint_rows(engine: TorchEngine, n: int, strengths: list[float],
                 steps_list: list[int]) -> list[dict]:
    cases = inpaint_cases(n)
    rows = []
    for steps in steps_list:
        for strength in strengths:
            images = generate_offline(engine, [c[2] for c in cases],
                                      [SEED + i for i in range(n)], steps,
                                      edits=[Edit(src, strength, mask)
                                             for src, mask, _, _ in cases])
            unchanged, coloured = [], []
            for img, (src, mask, _, colour) in zip(images, cases):
                unchanged.append(bool(np.array_equal(img[~mask], src[~mask])))
                dist = np.abs(img[mask].astype(int) - np.array(PALETTE[colour])).sum(1)
                coloured.append(float((dist < 90).mean()) >= 0.2)
            rows.append({"task": "inpaint", "steps": steps, "strength": strength,
                         "outside_unchanged": 100 * float(np.mean(unchanged)),
                         "new_colour_inside": 100 * float(np.mean(coloured))})
    return rows


def cost_rows(engine: TorchEngine, strengths: list[float], steps_list: list[int],
              n: int = 8) -> list[dict]:
    """Denoiser rows an edit runs, relative to a generation of the same steps."""
    sources, prompts, _ = recolour_cases(n)
    rows = []
    denoise = engine.denoise
    counted = [0]

    def counting(x, *a):  # type: ignore[no-untyped-def]
        counted[0] += x.shape[0]
        return denoise(x, *a)

    engine.denoise = counting  # type: ignore[method-assign]
    try:
        for steps in steps_list:
            counted[0] = 0
            generate_offline(engine, prompts, list(range(n)), steps)
            full = counted[0]
            for strength in strengths:
                counted[0] = 0
                generate_offline(engine, prompts, list(range(n)), steps,
                                 edits=[Edit(s, strength) for s in sources])
                rows.append({"task": "cost", "steps": steps, "strength": strength,
                             "cost_x": counted[0] / full})
    finally:
        engine.denoise = denoise  # type: ignore[method-assign]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=100, help="cases per task")
    p.add_argument("--strengths", default="0.5,0.75,0.9")
    p.add_argument("--steps", default="4,8")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    engine = TorchEngine(precision=args.precision)
    strengths = [float(s) for s in args.strengths.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    recolour = recolour_rows(engine, Yardstick(), args.n, strengths, steps)
    inpaint = inpaint_rows(engine, args.n, [1.0, *strengths], steps)
    cost = cost_rows(engine, strengths, steps)
    for rows in (recolour, inpaint, cost):
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for r in rows:
            print("| " + " | ".join(f"{r[k]:g}" if k in ("strength", "cost_x") else
                                    f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k])
                                    for k in keys) + " |")
        print()
    if args.json:
        args.json.write_text(json.dumps({"recolour": recolour, "inpaint": inpaint,
                                         "cost": cost}, indent=2))


if __name__ == "__main__":
    main()
