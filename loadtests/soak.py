"""Soak: many concurrent clients for minutes; only 200s and 429s allowed, memory stays flat.

Memory growth is measured from the RSS after the first 20% of the run (the server
has then seen every batch size under load) to the end; `--json` keeps the series.

    stepserve bench soak --clients 200 --duration 300 --max-queue 64
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import time
from pathlib import Path

import httpx
import numpy as np

from .launch import rss_mb, server_process

PROMPTS = ["a small red circle in the top left on a white background",
           "a large blue square at the bottom right on a yellow background",
           "little green triangle, centre, black background"]


async def client_loop(c: httpx.AsyncClient, url: str, stop: float, counts: collections.Counter,
                      rng: random.Random, failures: list[str]) -> None:
    while time.perf_counter() < stop:
        body = {"prompt": rng.choice(PROMPTS), "num_inference_steps": rng.choice([1, 2, 4]),
                "seed": rng.randrange(10**6)}
        try:
            r = await c.post(f"{url}/v1/images/generations", json=body)
            counts[r.status_code] += 1
            if r.status_code == 429:
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
        except httpx.HTTPError as exc:
            counts[type(exc).__name__] += 1
            failures.append(f"{time.perf_counter() - stop:+.1f}s {type(exc).__name__}: {exc!r}")


async def soak(url: str, pid: int, clients: int, duration: float) -> dict:
    counts: collections.Counter = collections.Counter()
    failures: list[str] = []
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients)
    stop = time.perf_counter() + duration
    samples = []

    async def sample_memory() -> None:
        while time.perf_counter() < stop:
            samples.append((time.perf_counter(), rss_mb(pid)))
            await asyncio.sleep(5)

    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        await asyncio.gather(sample_memory(), *(client_loop(c, url, stop, counts,
                                                            random.Random(k), failures)
                                                for k in range(clients)))
    t0 = samples[0][0]
    series = [(round(t - t0, 1), round(m, 1)) for t, m in samples]
    warm = [m for t, m in series if t >= duration * 0.2] or [series[0][1]]
    late = [(t, m) for t, m in series if t >= duration * 0.2]
    slope = float(np.polyfit([t for t, _ in late], [m for _, m in late], 1)[0] * 60
                  ) if len(late) > 2 else float("nan")
    return {"clients": clients, "duration_s": duration, "status_counts": dict(counts),
            "errors": sum(v for k, v in counts.items() if k not in (200, 429)),
            "failures": failures[:20], "rss_start_mb": warm[0], "rss_end_mb": series[-1][1],
            "rss_peak_mb": max(m for _, m in series),
            "rss_growth_pct": 100 * (series[-1][1] - warm[0]) / warm[0],
            "rss_slope_mb_per_min_after_warmup": slope, "rss_series": series}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration", type=float, default=300)
    p.add_argument("--max-queue", default="64")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with server_process("--precision", args.precision, "--max-queue", args.max_queue,
                        "--max-batch-size", "32") as (url, proc):
        result = asyncio.run(soak(url, proc.pid, args.clients, args.duration))
    print(json.dumps({k: v for k, v in result.items() if k != "rss_series"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
