"""`stepserve generate`: prompts in, PNGs out, no server."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import add_model_flags, apply_threads

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

    from stepserve.models.builtin.pipeline import BuiltinPipeline

    pipe = BuiltinPipeline(device=args.device, precision=args.precision)
    native = f"{pipe.cfg.image_size}x{pipe.cfg.image_size}"
    if args.size not in (None, native):
        print(f"error: --size {args.size}: the built-in model makes {native}", file=sys.stderr)
        return 2
    seeds = [args.seed + i for i in range(len(prompts))]
    pipe.generate(prompts[:1], seeds[:1], steps=1, guidance=args.guidance)  # warm-up
    start = time.perf_counter()
    images = pipe.generate(prompts, seeds, steps=args.steps, guidance=args.guidance,
                           sampler=args.sampler, max_batch=args.max_batch_size)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(args.out / f"{i:04d}.png")
    print(f"images={len(images)} seconds={seconds:.2f} images_per_s={len(images) / seconds:.2f} "
          f"steps={args.steps} precision={args.precision} out={args.out}")
    return 0
