"""`stepserve train-builtin`: reproduce the built-in model's shipped checkpoint."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "train the built-in shapes model (classifier, then DiT); seeded and resumable"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, default=Path("runs/builtin"),
                   help="checkpoints and logs; rerun with the same dir to resume")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write the final weights (default RUN_DIR/weights)")
    p.add_argument("--steps", type=int, default=None, help="DiT training steps")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier-steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=None,
                   help="quick accuracy check every N steps (0: never)")
    p.add_argument("--recipe", default="v3", choices=["v2", "v3"],
                   help="v3 (default, shipped): the v2 run, then a second stage from its "
                        "weights (in RUN_DIR/v2 unless --init-from); v2: the first stage")
    p.add_argument("--init-from", type=Path, default=None,
                   help="v3: start the second stage from this dit.safetensors (a v2 "
                        "checkpoint) instead of training v2 first")
    p.add_argument("--captions", default=None, choices=["v1", "v2", "v3"],
                   help="training-caption grammar (default: the recipe's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lazydit", action="store_true",
                   help="also train the LazyDiT gates for the trained DiT (base frozen)")
    p.add_argument("--lazydit-only", action="store_true",
                   help="only train the LazyDiT gates, for the DiT already in --out")
    p.add_argument("--lora", action="append", default=None, choices=["night", "mirror"],
                   metavar="STYLE",
                   help="train a LoRA adapter of the built-in model instead (night, mirror; "
                        "repeatable), on the DiT in --out if there is one, else the shipped "
                        "one; written to OUT/loras/STYLE.safetensors, run in RUN_DIR/STYLE")
    p.add_argument("--lora-steps", type=int, default=None, help="LoRA training steps")
    p.add_argument("--lora-rank", type=int, default=None)


def quick_evaluator(encoder, classifier, n: int, guidance: float):
    """All-five accuracy of the EMA model at 1 and 4 steps on seen/unseen prompts."""
    from functools import partial

    from stepserve.engines.torch_engine import TorchEngine
    from stepserve.models.builtin.yardstick import Yardstick, evaluate
    from stepserve.server.scheduler.offline import generate_offline

    stick = Yardstick(classifier)

    def run(ema) -> dict[str, float]:
        engine = TorchEngine(dit=ema, encoder=encoder, guidance=guidance)
        rows = evaluate(partial(generate_offline, engine), stick, steps_list=(1, 4), n=n,
                        guidance=guidance, with_fd=False)
        scores = {f"{r.prompt_set}@{r.steps}": round(r.accuracy["all_five"], 1) for r in rows}
        return scores | {f"strict {r.prompt_set}@{r.steps}": round(r.strict["all_five"], 1)
                         for r in rows if r.strict}

    return run


def check_args(args: argparse.Namespace) -> Path:
    """The weights folder, or CommandError for a bad value; before any training starts."""
    from .common import CommandError

    for flag, value, least in (("--steps", args.steps, 1), ("--batch", args.batch, 1),
                               ("--classifier-steps", args.classifier_steps, 1),
                               ("--eval-every", args.eval_every, 0),
                               ("--threads", args.threads, 1),
                               ("--lora-steps", args.lora_steps, 1),
                               ("--lora-rank", args.lora_rank, 1)):
        if value is not None and value < least:
            raise CommandError(f"{flag} {value}: give {least} or more")
    out = args.out or args.run_dir / "weights"
    for flag, path in (("--run-dir", args.run_dir), ("--out", out)):
        if path.exists() and not path.is_dir():
            raise CommandError(f"{flag} {path}: exists and is not a folder")
    if args.init_from is not None and not args.init_from.is_file():
        raise CommandError(f"--init-from {args.init_from}: no such file")
    if args.init_from is not None and args.recipe != "v3":
        raise CommandError("--init-from starts recipe v3's second stage; "
                           f"--recipe {args.recipe} trains from scratch")
    if args.lazydit_only and not (out / "dit.safetensors").is_file():
        raise CommandError(f"--lazydit-only trains gates for the DiT in --out, and "
                           f"{out / 'dit.safetensors'} does not exist; train it first "
                           "(leave out --lazydit-only) or point --out at it")
    return out


def run(args: argparse.Namespace) -> int:
    out = check_args(args)
    import torch

    from stepserve.models.builtin.classifier import (
        accuracy_on_renders,
        load_classifier,
        save_classifier,
        train_classifier,
    )
    from stepserve.models.builtin.report import plot_training
    from stepserve.models.builtin.text import TextEncoder
    from stepserve.models.builtin.train import recipe, train

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.lora:
        return train_loras(args, out)
    cls_path = out / "classifier.safetensors"
    if not cls_path.exists():
        start = time.perf_counter()
        classifier = train_classifier(steps=args.classifier_steps, seed=args.seed)
        acc = accuracy_on_renders(classifier)
        save_classifier(classifier, cls_path, {"train_seconds": round(time.perf_counter() - start),
                                               "steps": args.classifier_steps,
                                               "accuracy_on_renders": acc})
        print("classifier accuracy on renders:", json.dumps(acc))
    classifier = load_classifier(cls_path)
    if args.lazydit_only:
        return train_lazydit(out)
    encoder = TextEncoder()
    init_from = args.init_from
    if args.recipe == "v3" and init_from is None:  # the first stage, itself resumable
        first = recipe("v2", args.seed)
        init_from = args.run_dir / "v2" / "dit.safetensors"
        train(first, args.run_dir / "v2", out=init_from, encoder=encoder,
              evaluator=quick_evaluator(encoder, classifier, first.eval_prompts,
                                        first.eval_guidance))
    cfg = recipe(args.recipe, args.seed, str(init_from or ""))
    stage_dir = args.run_dir / args.recipe  # each stage its own checkpoints and captions
    for name in ("steps", "batch", "eval_every", "captions"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    evaluator = (quick_evaluator(encoder, classifier, cfg.eval_prompts, cfg.eval_guidance)
                 if cfg.eval_every else None)
    train(cfg, stage_dir, out=out / "dit.safetensors", encoder=encoder, evaluator=evaluator)
    plot_training(stage_dir / "log.jsonl", out / "training.png")
    print(f"weights written to {out}")
    return train_lazydit(out) if args.lazydit else 0


def train_lazydit(out) -> int:
    """LazyDiT gates for the DiT in `out`, written beside it (lazydit.safetensors)."""
    from stepserve.engines.torch_engine import TorchEngine
    from stepserve.models.builtin.loading import load_dit
    from stepserve.models.caches.lazydit_train import save_gates, train_gates

    dit = load_dit(out / "dit.safetensors")
    gates, meta = train_gates(dit, TorchEngine(dit=dit))
    save_gates(gates, dit, out / "lazydit.safetensors", meta)
    print(f"LazyDiT gates written to {out / 'lazydit.safetensors'}: {meta['log'][-1]}")
    return 0


def train_loras(args: argparse.Namespace, out: Path) -> int:
    """The built-in model's LoRA styles (models/builtin/lora_train.py), one after another."""
    from stepserve.models.builtin.loading import DIT_PATH, load_dit
    from stepserve.models.builtin.lora_train import LoraTrainConfig, train_lora
    from stepserve.models.builtin.text import TextEncoder

    base = out / "dit.safetensors" if (out / "dit.safetensors").is_file() else DIT_PATH
    encoder = TextEncoder()
    for style in args.lora:
        cfg = LoraTrainConfig(style=style, seed=args.seed)
        if args.lora_steps is not None:
            cfg.steps = args.lora_steps
        if args.lora_rank is not None:
            cfg.rank = args.lora_rank
        if args.batch is not None:
            cfg.batch = args.batch
        path = out / "loras" / f"{style}.safetensors"
        train_lora(cfg, load_dit(base), args.run_dir / style, path, encoder)
        print(f"adapter {style!r} written to {path} (base {base})")
    return 0
