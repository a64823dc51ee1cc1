"""Open-loop load generator: Poisson arrivals at a set rate, mixed step counts, over HTTP.

Each request streams with one partial image so time to first preview is measured.
Prints throughput and latency percentiles; `--json` keeps the raw numbers.

    stepserve bench openloop --url http://127.0.0.1:8000 --rate 2 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np


@dataclass
class Sample:
    steps: int
    status: int
    latency_s: float
    first_preview_s: float | None
    strength: float | None = None  # an edit's, None for a generation


@dataclass
class RunResult:
    rate: float
    duration_s: float
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        ok = [s for s in self.samples if s.status == 200]
        lat = np.array([s.latency_s for s in ok]) if ok else np.array([np.nan])
        ttfp = np.array([s.first_preview_s for s in ok if s.first_preview_s is not None]
                        or [np.nan])
        return {"offered_rps": self.rate, "sent": len(self.samples), "ok": len(ok),
                "rejected_429": sum(s.status == 429 for s in self.samples),
                "errors": sum(s.status not in (200, 429) for s in self.samples),
                "throughput_rps": len(ok) / self.duration_s,
                "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
                "p99_s": float(np.percentile(lat, 99)),
                "ttfp_p50_s": float(np.percentile(ttfp, 50)),
                "ttfp_p95_s": float(np.percentile(ttfp, 95))}


def source_png() -> bytes:
    """An edit source: a rendered scene of the built-in model's data."""
    import io

    from PIL import Image

    from stepserve.models.builtin.shapes import render, sample_scene

    out = io.BytesIO()
    Image.fromarray(render([sample_scene(np.random.default_rng(0))])[0]).save(out, "PNG")
    return out.getvalue()


async def one_request(client: httpx.AsyncClient, url: str, steps: int, seed: int,
                      prompt: str, strength: float | None = None,
                      source: bytes = b"") -> Sample:
    """A streamed generation, or (with a strength) a streamed edit of `source`."""
    start = time.perf_counter()
    first = None
    body = {"prompt": prompt, "num_inference_steps": steps, "seed": seed, "stream": True,
            "partial_images": 1 if steps > 1 else 0}
    if strength is None:
        request = client.stream("POST", f"{url}/v1/images/generations", json=body)
    else:
        form = {k: str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in {**body, "strength": strength}.items()}
        request = client.stream("POST", f"{url}/v1/images/edits", data=form,
                                files={"image": ("source.png", source, "image/png")})
    try:
        async with request as r:
            if r.status_code != 200:
                await r.aread()
                return Sample(steps, r.status_code, time.perf_counter() - start, None,
                              strength)
            async for line in r.aiter_lines():
                if line.startswith("data:") and first is None:
                    first = time.perf_counter() - start
                if ".completed" in line:
                    return Sample(steps, 200, time.perf_counter() - start, first, strength)
                if '"error"' in line:
                    return Sample(steps, 500, time.perf_counter() - start, first, strength)
    except httpx.HTTPError:
        pass
    return Sample(steps, 599, time.perf_counter() - start, first, strength)


async def run_open_loop(url: str, rate: float, duration_s: float, steps_mix: list[int],
                        seed: int = 0, prompts: list[str] | None = None,
                        edit_share: float = 0.0,
                        strengths: tuple[float, ...] = (0.5, 0.75, 0.9)) -> RunResult:
    """Poisson arrivals; `edit_share` of them are edits at a strength drawn from
    `strengths`."""
    source = source_png() if edit_share > 0 else b""
    rng = random.Random(seed)
    prompts = prompts or ["a small red circle in the top left on a white background",
                          "a large blue square at the bottom right on a yellow background",
                          "a green triangle, small, in the centre on a black background"]
    result = RunResult(rate, duration_s)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        t = rng.expovariate(rate)
        while t < duration_s:
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            strength = None  # (no extra draw without edits: the same arrivals as before)
            if edit_share > 0 and rng.random() < edit_share:
                strength = rng.choice(strengths)
            tasks.append(asyncio.create_task(one_request(
                client, url, rng.choice(steps_mix), rng.randrange(10**6), rng.choice(prompts),
                strength, source)))
            t += rng.expovariate(rate)
        result.samples = list(await asyncio.gather(*tasks))
    return result


def print_table(rows: list[dict[str, float]], label: str = "") -> None:
    cols = ["offered_rps", "throughput_rps", "ok", "rejected_429", "errors", "p50_s", "p95_s",
            "p99_s", "ttfp_p50_s", "ttfp_p95_s"]
    print(("| " + label + " " if label else "") + "| " + " | ".join(cols) + " |")
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        print(("| " + row.get("label", "") + " " if label else "") + "| " + " | ".join(cells)
              + " |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--rate", type=float, nargs="+", default=[1.0], help="requests/s")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--steps", default="2,4,8", help="step counts drawn uniformly")
    p.add_argument("--json", help="write raw samples here")
    args = p.parse_args(argv)
    mix = [int(s) for s in args.steps.split(",")]
    results = [asyncio.run(run_open_loop(args.url, r, args.duration, mix)) for r in args.rate]
    print_table([r.summary() for r in results])
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"rate": r.rate, "samples": [asdict(s) for s in r.samples]}
                       for r in results], f)


if __name__ == "__main__":
    main()
