"""`stepserve generate`: prompts in, PNGs out, no server (the same scheduler core and
engines as `serve`; the built-in model or a diffusers folder via --model)."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from .common import (
    BAR,
    CommandError,
    add_model_flags,
    add_progress_flag,
    cache_for,
    check_sampler,
    generate_images,
    load_model,
    progress_bar,
)

HELP = "generate images without a server"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", metavar="PROMPT")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps, 1..max_steps (default: the default_steps setting, 4)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed S+i (default: 0)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--sampler", default=None,
                   help="sampler (default: the model's; the built-in model: euler or "
                        "flow-euler; diffusers folders: default, euler, dpm++2m, ...)")
    p.add_argument("--size", default=None,
                   help="WxH (default: the model's; the built-in model makes 32x32, a "
                        "diffusers folder renders square sizes it supports)")
    p.add_argument("--out", type=Path, default=Path("out"),
                   help="folder for 0000.png, 0001.png, ... (default: out)")
    add_progress_flag(p)
    add_model_flags(p)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            lines = args.prompts_file.read_text().splitlines()
        except FileNotFoundError as exc:
            raise CommandError(f"--prompts-file {args.prompts_file}: no such file") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"--prompts-file {args.prompts_file}: cannot read it as text "
                               f"({exc})") from exc
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts


# torch generators take seeds in [-2**63, 2**64 - 1]
SEED_RANGE = (-(2**63), 2**64 - 1)


def make_out_dir(out: Path) -> None:
    """Create --out before any work, so a bad folder fails at once, not after generating."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise CommandError(f"--out {out}: exists and is not a folder") from exc
    except OSError as exc:
        raise CommandError(f"--out {out}: cannot create it ({exc.strerror})") from exc


def _square(size: str) -> int:
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if m is None or m.group(1) != m.group(2):
        raise CommandError(f"--size {size}: use a square WxH such as 512x512")
    return int(m.group(1))


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    if not prompts:
        raise CommandError("give at least one PROMPT or --prompts-file")
    if not (SEED_RANGE[0] <= args.seed and args.seed + len(prompts) - 1 <= SEED_RANGE[1]):
        raise CommandError(f"--seed {args.seed}: prompt i uses seed S+i, and seeds must be "
                           "between -2**63 and 2**64-1")
    if args.size is not None and args.model not in (None, "builtin") and args.image_size is None:
        args.image_size = _square(args.size)  # a diffusers folder renders the size asked
    settings, engine = load_model(args)
    steps = settings.default_steps if args.steps is None else args.steps
    if not 1 <= steps <= settings.max_steps:
        raise CommandError(f"--steps must be between 1 and max_steps ({settings.max_steps})")
    _, h, w = engine.info.image_shape
    if args.size not in (None, f"{w}x{h}"):
        raise CommandError(f"--size {args.size}: {engine.info.model!r} makes {w}x{h}")
    cache = cache_for(settings, engine)
    sampler = check_sampler(engine, args.sampler)
    make_out_dir(args.out)
    from PIL import Image

    batch = settings.max_batch_size
    engine.warmup((1, min(len(prompts), batch)))
    seeds = [args.seed + i for i in range(len(prompts))]
    start = time.perf_counter()
    # the bar counts image-steps; by default it shows for more than a handful of images
    # or many steps, on a terminal
    with progress_bar(args.progress, len(prompts) > 4 or steps > 16,
                      total=len(prompts) * steps, desc="generate", bar_format=BAR) as bar:
        images = generate_images(engine, prompts, seeds, steps, bar=bar, guidance=args.guidance,
                                 sampler=sampler, max_batch_size=batch,
                                 batching=settings.batching, cache=cache)
    seconds = time.perf_counter() - start
    for i, image in enumerate(images):
        Image.fromarray(image).save(args.out / f"{i:04d}.png")
    print(f"images={len(images)} seconds={seconds:.2f} images_per_s={len(images) / seconds:.2f} "
          f"steps={steps} precision={settings.precision} model={engine.info.model} "
          f"cache={settings.cache} out={args.out}")
    return 0
