"""Memory under hostile request patterns: a flood of cache-hit jobs, and a huge body.

    stepserve bench flood --jobs 8000 --n 10 --size 512x512 --plot docs/flood.png

One client sends `--jobs` identical seeded async jobs (answered from the exact result
cache after the first, so they take no queue slot) and never fetches them; the
server's RSS is sampled as they arrive. Then one request declares a 120 MB body and
starts sending it: the time until the server refuses it (413) and the RSS after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from collections import Counter
from pathlib import Path

import httpx

from .launch import rss_mb, server_process


async def flood(url: str, pid: int, jobs: int, body: dict, concurrency: int,
                every: int) -> tuple[Counter, list[tuple[int, float]]]:
    statuses: Counter = Counter()
    series: list[tuple[int, float]] = [(0, rss_mb(pid))]
    sent = 0

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < jobs:
            sent += 1
            r = await c.post(f"{url}/v1/jobs", json=body)
            statuses[r.status_code] += 1
            done = sum(statuses.values())
            if done % every == 0:
                series.append((done, rss_mb(pid)))

    async with httpx.AsyncClient(timeout=120) as c:
        first = (await c.post(f"{url}/v1/jobs", json=body)).json()["id"]  # fills the cache
        for _ in range(600):
            if (await c.get(f"{url}/v1/jobs/{first}")).json()["status"] == "completed":
                break
            await asyncio.sleep(0.1)
        series[0] = (0, rss_mb(pid))
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    series.append((sum(statuses.values()), rss_mb(pid)))
    return statuses, series


def huge_body(url: str, mb: int) -> tuple[float, int]:
    """Send an `mb` MB JSON body (declared up front) and time the server's first reply
    line, read by a second thread while the body is still being sent."""
    import threading

    host, port = url.removeprefix("http://").split(":")
    start = time.perf_counter()
    reply: list[tuple[float, bytes]] = []
    with socket.create_connection((host, int(port)), timeout=120) as s:

        def read() -> None:
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            reply.append((time.perf_counter() - start, data))

        reader = threading.Thread(target=read)
        reader.start()
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\n"
                  + f"Content-Length: {mb * 2**20}\r\n\r\n".encode())
        chunk = b"x" * 2**20
        try:
            for _ in range(mb):
                if reply:
                    break
                s.sendall(chunk)
        except OSError:
            pass  # refused and closed while sending: the reply says how
        reader.join(timeout=120)
    seconds, data = reply[0] if reply else (float("nan"), b"")
    line = data.split(b"\r\n", 1)[0].split()
    return seconds, int(line[1]) if len(line) > 1 else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--jobs", type=int, default=8000)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--size", default="512x512")
    p.add_argument("--format", default="jpeg")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--body-mb", type=int, default=120)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--python", help="run the server from this interpreter's stepserve "
                                    "install (e.g. an older version, side by side)")
    p.add_argument("server_args", nargs="*", help="extra `stepserve serve` flags")
    args = p.parse_args(argv)
    body = {"prompt": "a small red circle in the top left on a white background",
            "seed": 1, "n": args.n, "size": args.size, "output_format": args.format,
            "num_inference_steps": 2}
    with server_process("--precision", "bf16", "--warmup-batch-sizes", "1",
                        *args.server_args, python=args.python) as (url, proc):
        statuses, series = asyncio.run(flood(url, proc.pid, args.jobs, body,
                                             args.concurrency, max(1, args.jobs // 16)))
        refused_s, code = huge_body(url, args.body_mb)
        after_body = rss_mb(proc.pid)
    growth = series[-1][1] - series[0][1]
    print("| jobs sent | server RSS MB |\n|---|---|")
    for done, mb in series:
        print(f"| {done} | {mb:.0f} |")
    print(f"\nstatuses: {dict(statuses)}; RSS growth over the flood: {growth:.0f} MB")
    print(f"{args.body_mb} MB body: HTTP {code} after {refused_s * 1000:.0f} ms; "
          f"RSS after it {after_body:.0f} MB")
    out = {"statuses": dict(statuses), "series": series, "rss_growth_mb": growth,
           "body_mb": args.body_mb, "body_status": code, "body_refused_s": refused_s,
           "rss_after_body_mb": after_body, "request": body}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([d for d, _ in series], [m for _, m in series], marker="o")
        ax.set_xlabel("cache-hit jobs sent (never fetched)")
        ax.set_ylabel("server RSS (MB)")
        ax.set_title(f"{args.jobs} jobs, n={args.n}, {args.size} {args.format}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
