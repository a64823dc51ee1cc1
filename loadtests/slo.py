"""Goodput under overload: open-loop Poisson load at multiples of the saturation rate,
every request with a timeout of `--timeout-x` times its idle latency, against a
server with deadline-aware scheduling (`--deadlines forecast`) and without it
(`--deadlines off`: everything admitted, only the timeout ends a request).

Goodput is the share of offered requests answered with an image within their
timeout. Saturation is measured first: the completions per second of a closed loop
that keeps the server's batch full.

    stepserve bench slo --loads 0.5,1,1.5,2 --duration 30 --steps 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import httpx
import numpy as np

from .launch import server

PROMPTS = ["a small red circle in the top left on a white background",
           "a large blue square at the bottom right on a yellow background",
           "a green triangle, small, in the centre on a black background"]


async def one(client: httpx.AsyncClient, url: str, steps: int, seed: int,
              timeout: float | None) -> tuple[int, float, str]:
    body: dict = {"prompt": PROMPTS[seed % len(PROMPTS)], "num_inference_steps": steps,
                  "seed": seed}
    if timeout is not None:
        body["timeout"] = round(timeout, 3)
    start = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/images/generations", json=body)
        code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
        return r.status_code, time.perf_counter() - start, code or ""
    except httpx.HTTPError:
        return 599, time.perf_counter() - start, "transport"


async def idle_latency(url: str, steps: int, n: int = 5) -> float:
    async with httpx.AsyncClient(timeout=300) as c:
        return statistics.median([(await one(c, url, steps, i, None))[1] for i in range(n)])


async def saturation(url: str, steps: int, concurrency: int, seconds: float) -> float:
    """Completions per second with `concurrency` requests always in flight."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal done
        async with httpx.AsyncClient(timeout=300) as c:
            i = 0
            while time.perf_counter() < stop:
                status, _, _ = await one(c, url, steps, 1000 * k + i, None)
                done += status == 200
                i += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.perf_counter() - start)


async def open_loop(url: str, rate: float, seconds: float, steps: int, timeout: float,
                    seed: int) -> list[tuple[int, float, str]]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=timeout + 60, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        t = rng.expovariate(rate)
        while t < seconds:
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, url, steps, rng.randrange(10**6),
                                                 timeout)))
            t += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))


def summarise(samples: list[tuple[int, float, str]], timeout: float) -> dict:
    ok = [lat for status, lat, _ in samples if status == 200 and lat <= timeout]
    lat = np.array([lat for status, lat, _ in samples if status == 200] or [np.nan])
    codes: dict[str, int] = {}
    for status, _, code in samples:
        if status != 200:
            key = f"{status} {code}".strip()
            codes[key] = codes.get(key, 0) + 1
    return {"offered": len(samples), "goodput": len(ok) / max(1, len(samples)),
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "p99_s": float(np.percentile(lat, 99)), "refused_or_failed": codes}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", default="0.5,1,1.5,2", help="multiples of the saturation rate")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of offered load")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--timeout-x", type=float, default=4.0,
                   help="each request's timeout, in idle latencies")
    p.add_argument("--policies", default="off,forecast", help="--deadlines values to compare")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--saturation-s", type=float, default=15.0,
                   help="seconds of the closed loop that measures saturation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    loads = [float(x) for x in args.loads.split(",")]
    common = ["--threads", str(args.threads), "--precision", args.precision,
              "--max-batch-size", str(args.max_batch_size), "--result-cache-mb", "0",
              "--max-queue", "4096", "--warmup-batch-sizes", "1", str(args.max_batch_size)]
    rows, meta = [], {}
    for policy in args.policies.split(","):
        with server(*common, "--deadlines", policy) as url:
            if not meta:  # measured once, on the first server: the same load for both
                idle = asyncio.run(idle_latency(url, args.steps))
                sat = asyncio.run(saturation(url, args.steps, 2 * args.max_batch_size,
                                             args.saturation_s))
                meta = {"idle_latency_s": idle, "saturation_rps": sat,
                        "timeout_s": args.timeout_x * idle, "steps": args.steps}
                print(json.dumps(meta))
            asyncio.run(idle_latency(url, args.steps, 3))  # forward times measured
            for i, load in enumerate(loads):
                samples = asyncio.run(open_loop(url, load * meta["saturation_rps"],
                                                args.duration, args.steps,
                                                meta["timeout_s"], seed=i))
                row = {"deadlines": policy, "load_x": load, **summarise(samples,
                                                                         meta["timeout_s"])}
                rows.append(row)
                print(json.dumps(row))
                time.sleep(2 * meta["timeout_s"])  # let the previous load's work end
    print("\n| deadlines | load x | offered | goodput | p50 s | p95 s | p99 s | not served |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['deadlines']} | {r['load_x']:g} | {r['offered']} | {r['goodput']:.2f} | "
              f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} | "
              f"{', '.join(f'{k}: {v}' for k, v in sorted(r['refused_or_failed'].items()))} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
