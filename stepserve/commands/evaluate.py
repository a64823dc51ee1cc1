"""`stepserve eval`: the built-in model's quality yardstick as one table."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from .common import add_model_flags, apply_threads

HELP = "quality yardstick: per-attribute and all-five accuracy, FD and images/s per step count"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", default="1,2,4,8,16,32", help="comma-separated step counts")
    p.add_argument("--prompts", type=int, default=200, help="prompts per set (seen, unseen)")
    p.add_argument("--sets", default="seen,unseen")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--weights", type=Path, default=None, help="a dit.safetensors to evaluate")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    add_model_flags(p)


def run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    from stepserve.models.builtin.pipeline import BuiltinPipeline, load_dit
    from stepserve.models.builtin.yardstick import Yardstick, evaluate, format_table

    dit = load_dit(args.weights) if args.weights else None
    pipe = BuiltinPipeline(dit=dit, device=args.device, precision=args.precision,
                           guidance=args.guidance)
    pipe.generate(["warm-up"], [0], steps=1)
    rows = evaluate(pipe, Yardstick(), tuple(int(s) for s in args.steps.split(",")),
                    n=args.prompts, sampler=args.sampler, max_batch=args.max_batch_size,
                    sets=tuple(args.sets.split(",")))
    print(f"guidance={pipe.default_guidance} precision={args.precision} sampler={args.sampler} "
          f"prompts/set={args.prompts}")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0
