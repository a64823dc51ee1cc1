"""The built-in model's initial-noise scale: quality against variety.

Text-to-image starts from the seed's noise times the model card's `noise_scale`
(dit.json). A scale below 1 samples at a lower temperature: the strict yardstick and
FD improve, and this benchmark shows what that costs in variety: for prompts that
leave one attribute out, how evenly the model's picks for it spread over the
vocabulary (normalised entropy of the strict reader's readings, 1 = every value
equally often), at each scale.

    stepserve bench noise --scales 1,0.9,0.8,0.7 --prompts 200 --json docs/noise-scale.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from stepserve.engines.torch_engine import TorchEngine
from stepserve.loadtests.tables import markdown
from stepserve.models.builtin import geometry
from stepserve.models.builtin.captions import canonical_caption
from stepserve.models.builtin.shapes import ATTRIBUTES, VALUES, sample_scene
from stepserve.models.builtin.yardstick import Yardstick, evaluate
from stepserve.server.scheduler.offline import generate_offline

LEFT_OUT = ("size", "colour", "position", "background")  # the shape is always named


def left_out_prompts(n: int, drop: str, seed: int = 7) -> list[str]:
    """The spec's plainest wording of n random scenes, without the `drop` attribute."""
    rng = np.random.default_rng([seed, LEFT_OUT.index(drop)])
    return [canonical_caption(sample_scene(rng), omit=drop) for _ in range(n)]


def evenness(readings: np.ndarray, values: int) -> float:
    """Normalised entropy of the readable readings (unreadable: -1, left out)."""
    counts = np.bincount(readings[readings >= 0], minlength=values)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(values))


def scale_rows(engine: TorchEngine, args: argparse.Namespace) -> list[dict]:
    base = engine.info
    rows = []
    for scale in args.scales:
        engine.info = dataclasses.replace(base, noise_scale=scale)

        def generate(prompts, seeds, steps, **kwargs):
            return generate_offline(engine, prompts, seeds, steps, max_batch_size=32, **kwargs)

        evals = evaluate(generate, Yardstick(), tuple(args.steps), n=args.prompts,
                         guidance=base.default_guidance, sets=("seen", "unseen"))
        row: dict = {"noise_scale": scale}
        for r in evals:
            row[f"{r.prompt_set}@{r.steps} strict"] = r.strict["all_five"]
            row[f"{r.prompt_set}@{r.steps} FD"] = round(r.fd, 1)
        for drop in LEFT_OUT:
            prompts = left_out_prompts(args.left_out, drop)
            images = generate(prompts, list(range(1000, 1000 + len(prompts))), args.steps[-1],
                              guidance=base.default_guidance)
            readings = geometry.read(images)[:, ATTRIBUTES.index(drop)]
            row[f"{drop} left out: evenness"] = round(evenness(readings, len(VALUES[drop])), 2)
        rows.append(row)
        print(row, flush=True)
    engine.info = base
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="stepserve bench noise", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="1,0.9,0.8,0.7", help="initial-noise scales to compare")
    p.add_argument("--steps", default="1,4", help="step counts for the yardstick "
                   "(the last one also draws the left-out prompts)")
    p.add_argument("--prompts", type=int, default=200, help="yardstick prompts per set")
    p.add_argument("--left-out", type=int, default=144,
                   help="prompts per left-out attribute")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.scales = [float(s) for s in args.scales.split(",")]
    args.steps = [int(s) for s in args.steps.split(",")]
    if not all(0.0 < s <= 2.0 for s in args.scales):
        p.error(f"--scales {args.scales}: each must be in (0, 2]")
    if args.prompts < 2 or args.left_out < 1:
        p.error("--prompts must be at least 2 and --left-out at least 1")
    torch.set_num_threads(args.threads)
    rows = scale_rows(TorchEngine(precision="fp32"), args)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
