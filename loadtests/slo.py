"""Goodput under overload: open-loop Poisson load at multiples of the saturation rate,
every request with a timeout of `--timeout-x` times its idle latency, for three
policies: `off` (today's admission: everything admitted, only the timeout ends a
request), `forecast` (deadline-aware admission, ordering and dropping, fixed
quality) and `auto` (the same server, requests sent with `quality: auto`, their
steps a ceiling).

Goodput is the share of offered requests answered with an image within their
timeout. Saturation is measured first: the completions per second of a closed loop
that keeps the server's batch full. The prompts are the yardstick's seen set, so the
images delivered in time are scored too: all-five accuracy and FD (the built-in
model's yardstick), with the steps and caches they actually ran.

    stepserve bench slo --loads 0.5,1,1.5,2 --duration 30 --steps 16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from stepserve.models.builtin.yardstick import Yardstick, prompt_set

from . import slo_priority
from .launch import server

PROMPTS = prompt_set("seen", 500)


@dataclass
class Sample:
    status: int
    latency_s: float
    code: str = ""  # the error code of a request not served
    index: int = 0  # into PROMPTS
    ran: dict | None = None  # the response's stepserve block
    png: bytes = b""


async def one(client: httpx.AsyncClient, url: str, steps: int, index: int,
              timeout: float | None, quality: str | None = None) -> Sample:
    i = index % len(PROMPTS.prompts)
    body: dict = {"prompt": PROMPTS.prompts[i], "num_inference_steps": steps,
                  "seed": PROMPTS.seeds[i] + index // len(PROMPTS.prompts)}
    if timeout is not None:
        body["timeout"] = round(timeout, 3)
    if quality is not None:
        body["quality"] = quality
    start = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/images/generations", json=body)
    except httpx.HTTPError:
        return Sample(599, time.perf_counter() - start, "transport", i)
    latency = time.perf_counter() - start
    d = r.json()
    if r.status_code != 200:
        return Sample(r.status_code, latency, d.get("error", {}).get("code") or "", i)
    return Sample(200, latency, "", i, d.get("stepserve"),
                  base64.b64decode(d["data"][0]["b64_json"]))


async def idle_latency(url: str, steps: int, n: int = 5) -> float:
    async with httpx.AsyncClient(timeout=300) as c:
        return statistics.median([(await one(c, url, steps, i, None)).latency_s
                                  for i in range(n)])


async def saturation(url: str, steps: int, concurrency: int, seconds: float) -> float:
    """Completions per second with `concurrency` requests always in flight."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal done
        async with httpx.AsyncClient(timeout=300) as c:
            i = 0
            while time.perf_counter() < stop:
                ok = (await one(c, url, steps, 1000 * k + i, None)).status == 200
                done += ok  # after the await: `done += await ...` would read it before
                i += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.perf_counter() - start)


async def open_loop(url: str, rate: float, seconds: float, steps: int, timeout: float,
                    seed: int, quality: str | None = None) -> list[Sample]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=timeout + 60, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        t = rng.expovariate(rate)
        while t < seconds:
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, url, steps, rng.randrange(10**6),
                                                 timeout, quality)))
            t += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))


def summarise(samples: list[Sample], timeout: float, stick: Yardstick | None) -> dict:
    good = [x for x in samples if x.status == 200 and x.latency_s <= timeout]
    lat = np.array([x.latency_s for x in samples if x.status == 200] or [np.nan])
    codes: dict[str, int] = {}
    for x in samples:
        if x.status != 200:
            key = f"{x.status} {x.code}".strip()
            codes[key] = codes.get(key, 0) + 1
    plans: dict[str, int] = {}
    for x in good:
        ran = x.ran or {}
        key = f"{ran.get('steps')}{'+' + ran['cache'] if ran.get('cache') else ''}"
        plans[key] = plans.get(key, 0) + 1
    row = {"offered": len(samples), "goodput": len(good) / max(1, len(samples)),
           "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
           "p99_s": float(np.percentile(lat, 99)), "refused_or_failed": codes,
           "mean_steps": float(np.mean([(x.ran or {}).get("steps", 0) for x in good]))
           if good else float("nan"), "plans": plans}
    if stick is not None and good:
        images = np.stack([np.asarray(Image.open(io.BytesIO(x.png)).convert("RGB"))
                           for x in good])
        labels = PROMPTS.labels[[x.index for x in good]]
        scenes = tuple(PROMPTS.scenes[x.index] for x in good)
        row["all_five"] = stick.accuracy(images, labels)["all_five"]
        row["fd"] = stick.fd(images, scenes)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", default="0.5,1,1.5,2", help="multiples of the saturation rate")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of offered load")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--timeout-x", type=float, default=4.0,
                   help="each request's timeout, in idle latencies")
    p.add_argument("--timeout-s", type=float,
                   help="each request's timeout in seconds (instead of --timeout-x: the "
                   "idle latency of a shared machine varies between runs)")
    p.add_argument("--policies", default="off,forecast,auto",
                   help="off / forecast (fixed quality) / auto (quality: auto)")
    p.add_argument("--no-yardstick", action="store_true",
                   help="skip scoring the delivered images")
    p.add_argument("--scenarios", default="goodput,priority",
                   help="goodput: the load curve; priority: an urgent request that needs "
                   "the whole batch (slo_priority.py)")
    p.add_argument("--budgets", default="1024,1,1:on",
                   help="--live-state-mb values for the priority scenario, each with an "
                   "optional :--offload value (a small budget makes new requests wait on "
                   "CPU and offloads paused state on GPU; 1:on forces offloading)")
    p.add_argument("--low-steps", type=int, default=32,
                   help="steps of the low-priority requests in the priority scenario")
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
    stick = None if args.no_yardstick else Yardstick()
    rows: list[dict] = []
    meta: dict = {}
    scenarios = args.scenarios.split(",")
    for policy in args.policies.split(",") if "goodput" in scenarios else []:
        deadlines = "off" if policy == "off" else "forecast"
        quality = "auto" if policy == "auto" else None
        with server(*common, "--deadlines", deadlines) as url:
            if not meta:  # measured once, on the first server: the same load for all
                idle = asyncio.run(idle_latency(url, args.steps))
                sat = asyncio.run(saturation(url, args.steps, 2 * args.max_batch_size,
                                             args.saturation_s))
                meta = {"idle_latency_s": idle, "saturation_rps": sat,
                        "timeout_s": args.timeout_s or args.timeout_x * idle,
                        "steps": args.steps}
                print(json.dumps(meta))
            asyncio.run(idle_latency(url, args.steps, 3))  # forward times measured
            for i, load in enumerate(loads):
                samples = asyncio.run(open_loop(url, load * meta["saturation_rps"],
                                                args.duration, args.steps,
                                                meta["timeout_s"], seed=i, quality=quality))
                row = {"policy": policy, "load_x": load,
                       **summarise(samples, meta["timeout_s"], stick)}
                rows.append(row)
                print(json.dumps(row))
                time.sleep(2 * meta["timeout_s"])  # let the previous load's work end
    if args.json:  # the load curve is kept even if the next scenario fails
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    priority = []
    if "priority" in scenarios:
        priority = slo_priority.run(
            ["--threads", str(args.threads), "--max-batch-size", str(min(10, args.max_batch_size)),
             "--result-cache-mb", "0", "--max-queue", "4096", "--warmup-batch-sizes", "1"],
            args.budgets.split(","), min(10, args.max_batch_size), args.low_steps)
    print(table(rows) if rows else "")
    print(slo_priority.table(priority) if priority else "")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "priority": priority},
                                        indent=2))


def table(rows: list[dict]) -> str:
    out = ["", "| policy | load x | offered | goodput | p50 s | p95 s | p99 s | mean steps "
           "| plans (steps+cache: images) | all-five | FD | not served |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        plans = ", ".join(f"{k}: {v}" for k, v in sorted(r["plans"].items()))
        failed = ", ".join(f"{k}: {v}" for k, v in sorted(r["refused_or_failed"].items()))
        five = f"{r['all_five']:.1f}" if "all_five" in r else ""
        fd = f"{r['fd']:.1f}" if "fd" in r else ""
        out.append(f"| {r['policy']} | {r['load_x']:g} | {r['offered']} | {r['goodput']:.2f} "
                   f"| {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} | "
                   f"{r['mean_steps']:.1f} | {plans} | {five} | {fd} | {failed} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
