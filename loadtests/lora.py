"""LoRA adapters mixed in one batch: speed against no adapters and against batches
split by adapter (the peers' way), overhead by rank, and the built-in adapters' quality.

A saturating load runs through the scheduler core in-process: a closed loop keeps
`--in-flight` requests (default two batches' worth) queued or running, so batches
are as full as the policy allows; variants alternate round by round in one process
and the table reports medians and ratios.

    stepserve bench lora --requests 256 --adapters 1,2,4,8 --ranks 4,16,64 --quality 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from stepserve.engines.torch_engine import TorchEngine
from stepserve.loadtests.tables import markdown
from stepserve.models.lora.library import LoraLibrary
from stepserve.models.lora.testing import random_builtin_adapter
from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore
from stepserve.server.scheduler.events import Completed, Failed
from stepserve.server.scheduler.request import GenerationParams, LoraChoice, Request
from stepserve.server.settings import BUILTIN_LORA_DIR

PROMPTS = ["a red circle", "a large blue square on a white background",
           "a small green triangle in the top left", "a yellow circle at the bottom"]
Plan = list[tuple[LoraChoice, ...]]


def images_per_s(engine: TorchEngine, plan: Plan, steps: int, max_batch: int,
                 lora_batching: str, in_flight: int) -> float:
    """A closed loop: `in_flight` requests always queued or running (a new one as each
    finishes, as when that many clients wait), until the plan is done."""
    core = SchedulerCore(engine, SchedulerConfig(
        max_batch_size=max_batch, max_queue=len(plan) + 1,
        queue_cost=float((len(plan) + 1) * steps), lora_batching=lora_batching))

    def submit(i: int) -> None:
        core.submit(Request(str(i), GenerationParams(PROMPTS[i % len(PROMPTS)], steps, i,
                                                     1.0, lora=plan[i]), float(i)))

    sent = min(in_flight, len(plan))
    for i in range(sent):
        submit(i)
    start, done = time.perf_counter(), 0
    while core.has_work:
        for e in core.step():
            if isinstance(e, Failed):
                raise RuntimeError(e.message)
            if isinstance(e, Completed):
                done += 1
                if sent < len(plan):
                    submit(sent)
                    sent += 1
    return done / (time.perf_counter() - start)


def mixed_plan(n: int, names: list[str], seed: int = 0) -> Plan:
    """Each request takes 0, 1 or 2 of the adapters (a third each), scale 1."""
    rng = np.random.default_rng(seed)
    plan: Plan = []
    for _ in range(n):
        k = min(int(rng.integers(3)), len(names))
        picked = rng.choice(len(names), size=k, replace=False)
        plan.append(tuple(LoraChoice(names[j]) for j in sorted(picked)))
    return plan


def medians(engine: TorchEngine, variants: dict[str, tuple[Plan, str]],
            args: argparse.Namespace) -> dict[str, float]:
    """images/s of each (plan, lora_batching) variant, alternated round by round."""
    runs: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for name, (plan, mode) in variants.items():
            runs[name].append(images_per_s(engine, plan, args.steps, args.max_batch, mode,
                                           args.in_flight))
    return {k: statistics.median(v) for k, v in runs.items()}


def speed_rows(engine: TorchEngine, args: argparse.Namespace) -> list[dict]:
    """images/s: no adapters, mixed, split by adapter; per number of distinct adapters."""
    variants: dict[str, tuple[Plan, str]] = {"none": ([()] * args.requests, "mixed")}
    for k in args.adapters:
        names = [f"r{args.rank}-{i}" for i in range(k)]
        plan = mixed_plan(args.requests, names)
        variants[f"mixed/{k}"] = (plan, "mixed")
        variants[f"split/{k}"] = (plan, "split")
    med = medians(engine, variants, args)
    rows = []
    for k in args.adapters:
        mixed, split = med[f"mixed/{k}"], med[f"split/{k}"]
        rows.append({"adapters": k, "no_adapter_img_s": med["none"], "mixed_img_s": mixed,
                     "split_img_s": split, "mixed_vs_none": mixed / med["none"],
                     "mixed_vs_split": mixed / split})
    return rows


def rank_rows(engine: TorchEngine, args: argparse.Namespace) -> list[dict]:
    """Every row with one adapter of rank r, and with r distinct adapters of rank 8,
    against no adapters: the cost of the low-rank path itself."""
    variants: dict[str, tuple[Plan, str]] = {"none": ([()] * args.requests, "mixed")}
    for r in args.ranks:
        variants[f"rank {r}"] = ([(LoraChoice(f"r{r}-0"),)] * args.requests, "mixed")
    for k in args.adapters:
        names = [f"r{args.rank}-{i}" for i in range(k)]
        variants[f"{k} distinct"] = ([(LoraChoice(names[i % k]),)
                                      for i in range(args.requests)], "mixed")
    med = medians(engine, variants, args)
    return [{"rows": name, "img_s": v, "vs_none": v / med["none"]} for name, v in med.items()]


def quality_rows(engine: TorchEngine, args: argparse.Namespace) -> list[dict]:
    from stepserve.models.builtin.lora_eval import lora_rows
    from stepserve.models.builtin.yardstick import Yardstick
    from stepserve.server.scheduler.offline import generate_offline

    engine.loras = LoraLibrary([BUILTIN_LORA_DIR])
    return lora_rows(partial(generate_offline, engine), Yardstick(), args.quality,
                     args.quality_steps, choose=LoraChoice)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--in-flight", type=int, default=64,
                   help="requests queued or running at once (a closed loop)")
    p.add_argument("--rank", type=int, default=8, help="rank of the mixed-load adapters")
    p.add_argument("--adapters", default="1,2,4,8", help="distinct adapters in the load")
    p.add_argument("--ranks", default="4,16,64", help="ranks for the overhead table")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quality", type=int, default=0,
                   help="prompts for the built-in adapters' quality table (0: skip)")
    p.add_argument("--quality-steps", default="4")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.adapters = [int(a) for a in args.adapters.split(",")]
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.quality_steps = [int(s) for s in args.quality_steps.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = TorchEngine()
    out: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for r in sorted({args.rank, *args.ranks}):
            for i in range(max(args.adapters) if r == args.rank else 1):
                random_builtin_adapter(engine.dit, folder / f"r{r}-{i}.safetensors", rank=r,
                                       seed=100 * r + i)
        engine.loras = LoraLibrary([folder])
        engine.warmup((1, args.max_batch))
        out["speed"] = speed_rows(engine, args)
        print(markdown(out["speed"]) + "\n")
        out["rank"] = rank_rows(engine, args)
        print(markdown(out["rank"]) + "\n")
    if args.quality:
        out["quality"] = quality_rows(engine, args)
        print(markdown(out["quality"]) + "\n")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
