"""The priority scenario of `stepserve bench slo`: low-priority long requests keep the
batch full; a priority-0 request that needs every row (n = max batch) arrives. It
should finish near its idle latency, the low-priority requests it paused should
resume with the images they would have had, and a small live-state budget
(`--live-state-mb`) should bound their state: new requests wait (CPU), or paused
state moves to host memory (GPU).
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time

import httpx
import numpy as np
from PIL import Image

from .launch import server

PROMPT = "a large red circle in the top left on a white background"
URGENT = "a small blue square at the bottom right on a black background"


async def generate(c: httpx.AsyncClient, url: str, body: dict) -> tuple[float, list]:
    start = time.perf_counter()
    r = await c.post(f"{url}/v1/images/generations", json=body)
    r.raise_for_status()
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB"))
              for d in r.json()["data"]]
    return time.perf_counter() - start, images


def metric(text: str, name: str) -> float:
    """A counter, gauge or histogram sum (summed over labels) from a /metrics page."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def scenario(url: str, max_batch: int, low_steps: int, urgent_steps: int,
                   lows: int) -> dict:
    urgent = {"prompt": URGENT, "n": max_batch, "num_inference_steps": urgent_steps,
              "seed": 1, "priority": 0}
    async with httpx.AsyncClient(timeout=600) as c:
        idle, _ = await generate(c, url, urgent)
        idle, _ = await generate(c, url, urgent)  # warm
        before = (await c.get(f"{url}/metrics")).text
        bodies = [{"prompt": PROMPT, "num_inference_steps": low_steps, "seed": 100 + i,
                   "priority": 5} for i in range(lows)]
        low_tasks = [asyncio.create_task(generate(c, url, b)) for b in bodies]
        await asyncio.sleep(0.5 + 0.2 * low_steps * 0.05)  # the batch is full by now
        busy, _ = await generate(c, url, urgent)
        low = await asyncio.gather(*low_tasks)
        after = (await c.get(f"{url}/metrics")).text
        alone = [(await generate(c, url, b))[1][0] for b in bodies[:max_batch]]
    diffs = [int(np.abs(low[i][1][0].astype(int) - alone[i].astype(int)).max())
             for i in range(len(alone))]
    delta = {k: metric(after, k) - metric(before, k) for k in (
        "stepserve_preemptions_total", "stepserve_paused_seconds_sum",
        "stepserve_paused_seconds_count", "stepserve_live_state_waits_total",
        "stepserve_state_offload_rows_total")}
    return {"idle_s": idle, "busy_s": busy, "slowdown_x": busy / idle,
            "max_grey_diff_resumed": max(diffs), "preemptions": delta[
                "stepserve_preemptions_total"],
            "mean_pause_s": delta["stepserve_paused_seconds_sum"] / max(
                1.0, delta["stepserve_paused_seconds_count"]),
            "admission_waits": delta["stepserve_live_state_waits_total"],
            "offloaded_rows": delta["stepserve_state_offload_rows_total"]}


def run(common: list[str], budgets: list[str], max_batch: int, low_steps: int = 32,
        urgent_steps: int = 8, lows: int | None = None) -> list[dict]:
    """`budgets`: --live-state-mb values, each optionally with an --offload value
    ("1:on" forces offloading where it is off by default, e.g. on a CPU)."""
    rows = []
    for spec in budgets:
        budget, _, offload = spec.partition(":")
        with server(*common, "--precision", "fp32", "--live-state-mb", budget,
                    "--offload", offload or "auto") as url:
            row = asyncio.run(scenario(url, max_batch, low_steps, urgent_steps,
                                       lows or 2 * max_batch))
        rows.append({"live_state_mb": float(budget), "offload": offload or "auto", **row})
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["", "| live_state_mb | offload | urgent idle s | urgent busy s | slowdown | "
           "preemptions | mean pause s | admission waits | offloaded rows | "
           "resumed: max grey diff |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['live_state_mb']:g} | {r['offload']} | {r['idle_s']:.2f} | "
                   f"{r['busy_s']:.2f} | {r['slowdown_x']:.2f}x | {r['preemptions']:.0f} | "
                   f"{r['mean_pause_s']:.2f} | {r['admission_waits']:.0f} | "
                   f"{r['offloaded_rows']:.0f} | {r['max_grey_diff_resumed']} |")
    return "\n".join(out)
