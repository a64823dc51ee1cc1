"""Edit quality on the built-in model (recolour, inpaint; models/builtin/edit_eval.py)
and what an edit costs in denoiser rows.

    stepserve bench edits --n 100 --strengths 0.5,0.75,0.9 --steps 4,8
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from stepserve.engines.torch_engine import TorchEngine
from stepserve.models.builtin.edit_eval import (
    format_rows,
    inpaint_rows,
    recolour_cases,
    recolour_rows,
)
from stepserve.models.builtin.yardstick import Yardstick
from stepserve.models.sampling.edit import Edit
from stepserve.server.scheduler.offline import generate_offline


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
    generate = partial(generate_offline, engine)
    recolour = recolour_rows(generate, Yardstick(), args.n, strengths, steps)
    inpaint = inpaint_rows(generate, args.n, [1.0, *strengths], steps)
    cost = cost_rows(engine, strengths, steps)
    for rows in (recolour, inpaint, cost):
        print(format_rows(rows) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"recolour": recolour, "inpaint": inpaint,
                                         "cost": cost}, indent=2))


if __name__ == "__main__":
    main()
