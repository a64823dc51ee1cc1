"""`stepserve eval`: the built-in model's quality yardstick as one table."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from .common import add_model_flags, apply_threads, engine_from_args

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
    from functools import partial

    from stepserve.models.builtin.yardstick import Yardstick, evaluate, format_table
    from stepserve.server.scheduler.offline import generate_offline

    engine = engine_from_args(args, weights=args.weights)
    engine.warmup((1, args.max_batch_size))
    generate = partial(generate_offline, engine, max_batch_size=args.max_batch_size,
                       batching=args.batching)
    guidance = engine.info.default_guidance if args.guidance is None else args.guidance
    rows = evaluate(generate, Yardstick(), tuple(int(s) for s in args.steps.split(",")),
                    n=args.prompts, guidance=guidance, sampler=args.sampler,
                    sets=tuple(args.sets.split(",")))
    quant = f" quantization={args.quantization}" if args.precision == "int8" else ""
    print(f"engine={args.engine} precision={args.precision}{quant} guidance={guidance} "
          f"sampler={args.sampler} prompts/set={args.prompts}")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0
