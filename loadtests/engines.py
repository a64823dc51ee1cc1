"""Engines and precisions side by side: quality (built-in yardstick) and denoiser speed.

    stepserve bench engines --prompts 200 --steps 4 --batch 32 --threads 2

Speed is measured round-robin (every variant once per round, several rounds) so
machine noise hits all variants alike; ratios are against torch fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from stepserve.engines.registry import create_engine
from stepserve.models.builtin.text import TextEncoder
from stepserve.models.builtin.yardstick import Yardstick, evaluate, palette_error, prompt_set
from stepserve.server.scheduler.offline import generate_offline

# (label, engine, precision, quantization, apply Q-Sched if the build has it)
VARIANTS = [
    ("torch fp32", "torch", "fp32", None, False),
    ("torch bf16", "torch", "bf16", None, False),
    ("torch int8 (torchao weights)", "torch", "int8", None, False),
    ("onnxruntime fp32", "onnxruntime", "fp32", "static", False),
    ("onnxruntime int8 dynamic", "onnxruntime", "int8", "dynamic", False),
    ("onnxruntime int8 dynamic + Q-Sched", "onnxruntime", "int8", "dynamic", True),
    ("onnxruntime int8 static QDQ", "onnxruntime", "int8", "static", False),
    ("onnxruntime int8 static QDQ + Q-Sched", "onnxruntime", "int8", "static", True),
    # control: does the int8 build's Q-Sched pair help the float model just as much?
    ("torch fp32 + static int8's Q-Sched", "torch", "fp32", None, True),
]


def build(variant: tuple, encoder: TextEncoder, build_dir: Path | None):
    label, name, precision, quantization, qsched = variant
    kwargs: dict = {"precision": precision, "encoder": encoder}
    if name == "onnxruntime":
        kwargs.update(quantization=quantization, build_dir=build_dir,
                      threads=torch.get_num_threads(), qsched="stored" if qsched else None)
    elif qsched:  # borrow the static int8 build's pair
        int8 = create_engine("onnxruntime", precision="int8", quantization="static",
                             encoder=encoder, build_dir=build_dir)
        kwargs["qsched"] = int8.info.qsched
    engine = create_engine(name, **kwargs)
    if qsched and engine.info.qsched is None:
        return None  # no Q-Sched stored with this build (stepserve build --qsched)
    return engine


def speed(engines: dict, batch: int, rounds: int) -> dict[str, float]:
    """Denoiser forwards per second at `batch`, round-robin over variants."""
    gen = torch.Generator().manual_seed(0)
    text = next(iter(engines.values())).encode(list(prompt_set("seen", batch).prompts))
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    t, d = torch.rand(batch, generator=gen), torch.full((batch,), 0.25)
    times: dict[str, list[float]] = {k: [] for k in engines}
    for e in engines.values():
        e.denoise(x, t, d, text)  # warm
    for _ in range(rounds):
        for label, e in engines.items():
            start = time.perf_counter()
            for _ in range(3):
                e.denoise(x, t, d, text)
            times[label].append((time.perf_counter() - start) / 3)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="stepserve bench engines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--steps", default="4", help="comma-separated step counts")
    p.add_argument("--sets", default="seen")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--build-dir", type=Path, default=None)
    p.add_argument("--only", default=None, help="comma-separated variant labels to run")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder, stick = TextEncoder(), Yardstick()
    chosen = [v for v in VARIANTS if not args.only or v[0] in args.only.split(",")]
    engines = {}
    for v in chosen:
        e = build(v, encoder, args.build_dir)
        if e is None:
            print(f"skipped {v[0]}: no Q-Sched stored (run stepserve build ... --qsched)")
            continue
        engines[v[0]] = e
    ips = speed(engines, args.batch, args.rounds)
    steps = tuple(int(s) for s in args.steps.split(","))
    rows = []
    for label, e in engines.items():
        gen = partial(generate_offline, e, max_batch_size=args.batch)
        for r in evaluate(gen, stick, steps, n=args.prompts, sets=tuple(args.sets.split(","))):
            ps = prompt_set(r.prompt_set, args.prompts)
            images = gen(ps.prompts, ps.seeds, steps=r.steps)
            rows.append({"variant": label, "set": r.prompt_set, "steps": r.steps,
                         "strict_all_five": (r.strict or {}).get("all_five", float("nan")),
                         "all_five": r.accuracy["all_five"], "fd": r.fd,
                         "palette_error": palette_error(images),
                         "forward_images_per_s": ips[label],
                         "speed_vs_torch_fp32": ips[label] / ips.get("torch fp32", ips[label])})
    cols = ["variant", "set", "steps", "strict_all_five", "all_five", "fd", "palette_error",
            "forward_images_per_s", "speed_vs_torch_fp32"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
                                for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
