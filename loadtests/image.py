"""The CPU image against the same server outside it: time to ready and saturated
throughput, the same load on both, rounds alternating so that a shared machine's
noise falls on both alike.

    stepserve bench image --rounds 3 --seconds 20

Needs the image (scripts/build-image.sh) and podman with runc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from .launch import free_port, server_process, wait_ready
from .slo import saturation

# runc and explicit ulimits: crun, podman's default, cannot run on cgroup v1 hybrid hosts
PODMAN_RUN = ["podman", "--runtime", "runc", "run", "--rm", "-d", "--network", "host",
              "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


@contextlib.contextmanager
def container(image: str, args: list[str]) -> Iterator[tuple[str, float]]:
    port = free_port()
    name = f"stepserve-bench-{port}"
    start = time.monotonic()
    subprocess.run([*PODMAN_RUN, "--name", name, image, "serve", "--port", str(port),
                    *args], check=True, capture_output=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield url, time.monotonic() - start
    finally:
        subprocess.run(["podman", "stop", "-t", "30", name], capture_output=True)


@contextlib.contextmanager
def outside(args: list[str]) -> Iterator[tuple[str, float]]:
    start = time.monotonic()
    with server_process(*args) as (url, _):
        yield url, time.monotonic() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default="localhost/stepserve:cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0, help="of saturated load per round")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    common = ["--threads", str(args.threads), "--max-batch-size", "16",
              "--result-cache-mb", "0", "--warmup-batch-sizes", "1", "16"]
    runs: dict[str, list[dict]] = {"outside": [], "container": []}
    for _ in range(args.rounds):
        for where, launch in (("outside", lambda: outside(common)),
                              ("container", lambda: container(args.image, common))):
            with launch() as (url, ready_s):
                rps = asyncio.run(saturation(url, args.steps, args.concurrency, args.seconds))
            runs[where].append({"ready_s": ready_s, "images_per_s": rps})
            print(where, runs[where][-1], flush=True)
    rows = {w: {"ready_s": statistics.median(r["ready_s"] for r in rs),
                "images_per_s": statistics.median(r["images_per_s"] for r in rs)}
            for w, rs in runs.items()}
    ratio = rows["container"]["images_per_s"] / rows["outside"]["images_per_s"]
    print("\n| where | time to ready s | images/s (median of rounds) |")
    print("|---|---|---|")
    for w, r in rows.items():
        print(f"| {w} | {r['ready_s']:.1f} | {r['images_per_s']:.1f} |")
    print(f"\ncontainer / outside: {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": rows, "ratio": ratio},
                                        indent=2))


if __name__ == "__main__":
    main()
