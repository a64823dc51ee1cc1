"""`stepserve eval`: the built-in model's quality yardstick as one table."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from .common import add_model_flags, check_sampler, load_model

HELP = "quality yardstick: per-attribute and all-five accuracy, FD and images/s per step count"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", default="1,2,4,8,16,32", help="comma-separated step counts")
    p.add_argument("--prompts", type=int, default=200, help="prompts per set (seen, unseen)")
    p.add_argument("--sets", default="seen,unseen")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--sampler", default=None, help="euler or flow-euler (default: euler)")
    p.add_argument("--weights", type=Path, default=None, help="a dit.safetensors to evaluate")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    add_model_flags(p)


def run(args: argparse.Namespace) -> int:
    from functools import partial

    from stepserve.models.builtin.yardstick import Yardstick, evaluate, format_table
    from stepserve.server.scheduler.offline import generate_offline

    settings, engine = load_model(args, weights=args.weights)
    sampler = check_sampler(engine, args.sampler)
    engine.warmup((1, settings.max_batch_size))
    generate = partial(generate_offline, engine, max_batch_size=settings.max_batch_size,
                       batching=settings.batching)
    guidance = engine.info.default_guidance if args.guidance is None else args.guidance
    rows = evaluate(generate, Yardstick(), tuple(int(s) for s in args.steps.split(",")),
                    n=args.prompts, guidance=guidance, sampler=sampler,
                    sets=tuple(args.sets.split(",")))
    quant = f" quantization={settings.quantization}" if settings.precision == "int8" else ""
    print(f"engine={settings.engine} precision={settings.precision}{quant} "
          f"guidance={guidance} sampler={sampler} prompts/set={args.prompts}")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0
