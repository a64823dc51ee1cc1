"""`stepserve generate`: prompts in, PNGs out, no server."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import add_model_flags, apply_threads, engine_from_args

HELP = "generate images without a server"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", metavar="PROMPT")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed S+i")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--size", default=None, help="WxH; the built-in model makes 32x32")
    p.add_argument("--out", type=Path, default=Path("out"))
    add_model_flags(p)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        lines = args.prompts_file.read_text().splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    if not prompts:
        print("error: give at least one PROMPT or --prompts-file", file=sys.stderr)
        return 2
    if args.steps < 1:
        print("error: --steps must be at least 1", file=sys.stderr)
        return 2
    apply_threads(args.threads)
    from PIL import Image

    from stepserve.server.scheduler.offline import generate_offline

    try:
        engine = engine_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _, h, w = engine.info.image_shape
    if args.size not in (None, f"{w}x{h}"):
        print(f"error: --size {args.size}: the built-in model makes {w}x{h}", file=sys.stderr)
        return 2
    engine.warmup((1, min(len(prompts), args.max_batch_size)))
    seeds = [args.seed + i for i in range(len(prompts))]
    start = time.perf_counter()
    images = generate_offline(engine, prompts, seeds, args.steps, args.guidance, args.sampler,
                              args.max_batch_size, args.batching)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(args.out / f"{i:04d}.png")
    print(f"images={len(images)} seconds={seconds:.2f} images_per_s={len(images) / seconds:.2f} "
          f"steps={args.steps} precision={args.precision} out={args.out}")
    return 0
