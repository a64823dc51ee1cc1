"""Graceful drain, measured: SIGTERM while a stream, a plain request and an async job
are in flight.

    stepserve bench drain [--steps 96] [--timeout-s 120]

Prints when readiness turned 503, how each piece of work ended, and when the process
exited; run it once with a drain timeout longer than the work and once shorter.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from pathlib import Path

import httpx

from .launch import server_process

PROMPT = "a small red circle in the top left on a white background"


def run_once(steps: int, timeout_s: float) -> dict:
    out: dict = {"drain_timeout_s": timeout_s}
    started = threading.Event()
    with server_process("--threads", "1", "--max-steps", str(steps), "--queue-share", "1",
                        "--drain-timeout-s", str(timeout_s)) as (url, proc):
        def stream() -> None:
            last = None
            with httpx.stream("POST", f"{url}/v1/images/generations", timeout=300,
                              json={"prompt": PROMPT, "stream": True, "partial_images": 3,
                                    "num_inference_steps": steps}) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        last = json.loads(line[5:])
                        started.set()
            out["stream_end"] = last["type"] if last else None
            out["stream_end_s"] = time.monotonic() - t0

        def plain() -> None:
            r = httpx.post(f"{url}/v1/images/generations", timeout=300,
                           json={"prompt": PROMPT, "num_inference_steps": steps, "n": 2})
            out["plain_status"] = r.status_code
            out["plain_end_s"] = time.monotonic() - t0

        job = httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT, "num_inference_steps": steps,
                                                 "n": 2}).json()["id"]
        threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        started.wait(120)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while time.monotonic() - t0 < 10:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 503:
                out["ready_503_after_s"] = time.monotonic() - t0
                break
            time.sleep(0.02)
        out["new_request_status"] = httpx.post(f"{url}/v1/images/generations", timeout=5,
                                               json={"prompt": PROMPT}).status_code
        while True:
            try:
                view = httpx.get(f"{url}/v1/jobs/{job}", timeout=5).json()
            except httpx.HTTPError:
                out["job"] = "server gone before the job ended"
                break
            if view["status"] in ("completed", "failed", "cancelled"):
                out["job"] = view["status"] if view["status"] == "completed" else \
                    f"{view['status']}: {(view.get('error') or {}).get('code')}"
                out["job_fetched_s"] = time.monotonic() - t0
                break
            time.sleep(0.1)
        for t in threads:
            t.join(300)
        proc.wait(timeout=300)
        out["exit_after_s"] = time.monotonic() - t0
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--timeouts", default="120,2", help="drain timeouts to try, seconds")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = [run_once(args.steps, float(t)) for t in args.timeouts.split(",")]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r.get(k):.2f}" if isinstance(r.get(k), float)
                                else str(r.get(k)) for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
