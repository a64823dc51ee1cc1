"""Serving overhead: the server at saturation vs the raw batched engine, and one request
on an idle server vs the raw engine's generate call.

    stepserve bench overhead --precision bf16 --batch 16 --steps 4 --duration 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx
import torch

from stepserve.engines.torch_engine import TorchEngine
from stepserve.models.sampling.state import init_state, run_to_completion

from .launch import server

PROMPT = "a small red circle in the top left on a white background"


def raw_engine(precision: str, batch: int, steps: int, rounds: int) -> tuple[float, float]:
    """(images/s at `batch`, seconds for one single-image generate)."""
    engine = TorchEngine(precision=precision)
    engine.warmup((1, batch))
    info = engine.info

    def states(n: int, seed: int):
        text = engine.encode([PROMPT] * n + [""] * n)
        return [init_state(seed + i, steps, text.select([i]), text.select([n + i]),
                           shape=info.image_shape, guidance=info.default_guidance,
                           time_shift=info.time_shift) for i in range(n)]

    start = time.perf_counter()
    for r in range(rounds):
        run_to_completion(engine.denoise, states(batch, r * batch), max_batch=batch)
    throughput = rounds * batch / (time.perf_counter() - start)
    singles = []
    for r in range(5):
        t0 = time.perf_counter()
        out = run_to_completion(engine.denoise, states(1, 10_000 + r), max_batch=1)
        engine.decode(torch.stack([s.x for s in out]))
        singles.append(time.perf_counter() - t0)
    return throughput, statistics.median(singles)


async def saturate(url: str, clients: int, steps: int, duration: float,
                   extra: dict | None = None) -> float:
    done = 0
    stop = time.perf_counter() + duration

    async def worker(c: httpx.AsyncClient, k: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            r = await c.post(f"{url}/v1/images/generations",
                             json={"prompt": PROMPT, "num_inference_steps": steps,
                                   "seed": k * 100000 + i, **(extra or {})})
            done += r.status_code == 200
            i += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as c:
        await asyncio.gather(*(worker(c, k) for k in range(clients)))
    return done / (time.perf_counter() - start)


def idle_latency(url: str, steps: int) -> float:
    """One request at a time on an otherwise idle server, over a kept-alive connection
    (a new httpx client per request costs ~20 ms of client-side set-up) and without a
    seed, so the exact result cache never answers."""
    times = []
    with httpx.Client(timeout=60) as client:
        for _ in range(7):
            t0 = time.perf_counter()
            client.post(f"{url}/v1/images/generations",
                        json={"prompt": PROMPT, "num_inference_steps": steps})
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    raw_tput, raw_single = raw_engine(args.precision, args.batch, args.steps, args.rounds)
    with server("--precision", args.precision, "--max-batch-size", str(args.batch),
                "--max-queue", "1000") as url:
        single = idle_latency(url, args.steps)
        tput = asyncio.run(saturate(url, 2 * args.batch, args.steps, args.duration))
    rows = {"raw_images_per_s": raw_tput, "server_images_per_s": tput,
            "throughput_ratio": tput / raw_tput, "raw_single_s": raw_single,
            "server_single_s": single, "latency_ratio": single / raw_single}
    print("| metric | value |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
