"""`stepserve eval`: the built-in model's quality yardstick as one table."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .common import (
    BAR,
    CommandError,
    add_model_flags,
    add_progress_flag,
    check_sampler,
    generate_images,
    load_model,
    load_settings,
    progress_bar,
)

HELP = "quality yardstick: per-attribute and all-five accuracy, FD and images/s per step count"

SETS = ("seen", "unseen")  # the yardstick's prompt sets (yardstick.prompt_set)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", default="1,2,4,8,16,32",
                   help="comma-separated step counts, each 1..max_steps")
    p.add_argument("--prompts", type=int, default=200,
                   help="prompts per set (seen, unseen), at least 2")
    p.add_argument("--sets", default="seen,unseen", help="comma-separated: seen, unseen")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--noise-scale", type=float, default=None,
                   help="scale of the initial noise (default: the model's; 1 = unscaled)")
    p.add_argument("--sampler", default=None, help="euler or flow-euler (default: euler)")
    p.add_argument("--weights", type=Path, default=None, help="a dit.safetensors to evaluate")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--edits", action="store_true",
                   help="also measure edits: recolour and inpaint (docs/edits.md)")
    p.add_argument("--edit-steps", default="4,8", help="step counts of the edit tables")
    p.add_argument("--lora", action="store_true",
                   help="also measure the built-in adapters night and mirror, in batches "
                        "mixed with plain rows (docs/lora.md)")
    p.add_argument("--lora-steps", default="1,4", help="step counts of the LoRA table")
    p.add_argument("--edit-strengths", default="0.5,0.75,0.9",
                   help="strengths of the edit tables")
    p.add_argument("--reader-check", action="store_true",
                   help="only validate the strict reader on ground-truth and degraded "
                        "renders (blur, noise, jitter, ragged edges); no model is loaded")
    add_progress_flag(p)
    add_model_flags(p)


def parse_steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise CommandError(f"--steps {text}: give comma-separated whole numbers, "
                           "e.g. 1,2,4,8") from None
    return steps


def check_args(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(step counts, sets) from the flags, or CommandError; before any model loads."""
    steps = parse_steps(args.steps)
    sets = tuple(args.sets.split(","))
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise CommandError(f"--sets {args.sets}: unknown set {unknown[0]!r}; use "
                           f"{' and/or '.join(SETS)}, comma-separated")
    if args.prompts < 2:
        raise CommandError(f"--prompts {args.prompts}: the Frechet distance needs at least "
                           "2 prompts per set")
    if args.noise_scale is not None and not 0.0 < args.noise_scale <= 2.0:
        raise CommandError(f"--noise-scale {args.noise_scale}: must be in (0, 2]")
    if args.weights is not None and not args.weights.is_file():
        raise CommandError(f"--weights {args.weights}: no such file")
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()):
        raise CommandError(f"--json {args.json}: not a file in an existing folder")
    return steps, sets


def run(args: argparse.Namespace) -> int:
    from stepserve.models.builtin.yardstick import Yardstick, evaluate, format_table

    steps_list, sets = check_args(args)
    if args.reader_check:
        from stepserve.models.builtin.degrade import format_rows as reader_rows
        from stepserve.models.builtin.degrade import validation_rows

        rows_ = validation_rows(n=args.prompts)
        print(f"strict reader on renders of the contract ({args.prompts} per degraded row)")
        print(reader_rows(rows_))
        if args.json:
            args.json.write_text(json.dumps([{"images": n, **a} for n, a in rows_], indent=2))
        return 0
    settings = load_settings(args)
    if settings.model != "builtin":
        raise CommandError(f"--model {settings.model}: eval measures the built-in model "
                           "(--weights evaluates another DiT checkpoint)")
    if not all(1 <= s <= settings.max_steps for s in steps_list):
        raise CommandError(f"--steps {args.steps}: each must be between 1 and max_steps "
                           f"({settings.max_steps})")
    settings, engine = load_model(args, settings, weights=args.weights)
    sampler = check_sampler(engine, args.sampler)
    engine.warmup((1, settings.max_batch_size))
    guidance = engine.info.default_guidance if args.guidance is None else args.guidance
    if args.noise_scale is not None:
        engine.info = dataclasses.replace(engine.info, noise_scale=args.noise_scale)
    # the bar counts image-steps, so its time estimate holds as the step counts grow
    with progress_bar(args.progress, total=len(sets) * sum(steps_list) * args.prompts,
                      desc="eval", bar_format=BAR) as bar:

        def generate(prompts, seeds, steps, **kwargs):
            return generate_images(engine, prompts, seeds, steps, bar=bar,
                                   max_batch_size=settings.max_batch_size,
                                   batching=settings.batching, **kwargs)

        rows = evaluate(generate, Yardstick(), steps_list, n=args.prompts, guidance=guidance,
                        sampler=sampler, sets=sets)
    quant = f" quantization={settings.quantization}" if settings.precision == "int8" else ""
    print(f"engine={settings.engine} precision={settings.precision}{quant} "
          f"guidance={guidance} noise_scale={engine.info.noise_scale} sampler={sampler} "
          f"prompts/set={args.prompts}")
    print(format_table(rows))
    out: dict = {"rows": [asdict(r) for r in rows]}
    if args.edits:
        out.update(edit_tables(args, engine, settings))
    if args.lora:
        out["lora"] = lora_table(args, engine, settings, guidance)
    if args.json:
        args.json.write_text(json.dumps(out if args.edits or args.lora else out["rows"],
                                        indent=2))
    return 0


def edit_tables(args: argparse.Namespace, engine: object, settings: object) -> dict:
    """The edit quality tables (models/builtin/edit_eval.py), printed and returned."""
    from functools import partial

    from stepserve.models.builtin.edit_eval import format_rows, inpaint_rows, recolour_rows
    from stepserve.models.builtin.yardstick import Yardstick
    from stepserve.server.scheduler.offline import generate_offline

    steps = parse_steps(args.edit_steps)
    try:
        strengths = [float(s) for s in args.edit_strengths.split(",")]
    except ValueError:
        raise CommandError(f"--edit-strengths {args.edit_strengths}: give numbers in (0, 1]"
                           ) from None
    if not all(0 < s <= 1 for s in strengths):
        raise CommandError(f"--edit-strengths {args.edit_strengths}: each in (0, 1]")
    generate = partial(generate_offline, engine)
    recolour = recolour_rows(generate, Yardstick(), args.prompts, strengths, list(steps))
    inpaint = inpaint_rows(generate, args.prompts, strengths, list(steps))
    print("\nedits: recolour\n" + format_rows(recolour))
    print("\nedits: inpaint\n" + format_rows(inpaint))
    return {"recolour": recolour, "inpaint": inpaint}


def lora_table(args: argparse.Namespace, engine: Any, settings: Any,
               guidance: float) -> list[dict]:
    """The built-in adapters' quality (models/builtin/lora_eval.py), printed and returned."""
    from functools import partial

    from stepserve.models.builtin.edit_eval import format_rows
    from stepserve.models.builtin.lora_eval import lora_rows
    from stepserve.models.builtin.yardstick import Yardstick
    from stepserve.models.lora.library import LoraLibrary
    from stepserve.server.scheduler.offline import generate_offline
    from stepserve.server.scheduler.request import LoraChoice

    steps = parse_steps(args.lora_steps)
    engine.loras = LoraLibrary(settings.lora_dirs, int(settings.lora_cache_mb * 2**20))
    missing = {"night", "mirror"} - set(engine.loras.files)
    if missing:
        raise CommandError(f"--lora: no adapter {', '.join(sorted(missing))} in lora_dirs "
                           f"({', '.join(map(str, settings.lora_dirs))})")
    rows = lora_rows(partial(generate_offline, engine), Yardstick(), args.prompts, list(steps),
                     guidance=guidance, choose=LoraChoice)
    print("\nLoRA adapters (mixed batches)\n" + format_rows(rows))
    return rows
