"""Graceful drain on SIGTERM, as an operator sees it: a real `stepserve serve`
subprocess with a stream, a plain request and an async job in flight."""

import json
import signal
import threading
import time

import httpx
import pytest

from server_process import ServerProcess

pytestmark = pytest.mark.slow  # server subprocesses

PROMPT = "a small red circle in the top left on a white background"


def read_stream(url: str, body: dict, out: dict, started: threading.Event) -> None:
    events: list = []
    out["events"] = events
    with httpx.stream("POST", f"{url}/v1/images/generations", timeout=120,
                      json={"prompt": PROMPT, "stream": True, **body}) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                started.set()  # a preview arrived: the request is surely running


def test_sigterm_lets_streams_and_jobs_finish_and_refuses_new_work():
    srv = ServerProcess("--threads", "1", "--log-level", "warning", "--max-steps", "100")
    srv.wait_ready()
    stream: dict = {}
    started = threading.Event()
    job = httpx.post(f"{srv.url}/v1/jobs", json={"prompt": PROMPT, "num_inference_steps": 96,
                                                 "n": 2}).json()
    assert job["status"] in ("queued", "running"), job
    reader = threading.Thread(target=read_stream, args=(
        srv.url, {"num_inference_steps": 96, "partial_images": 3}, stream, started))
    reader.start()
    assert started.wait(60), "the stream never started"
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = httpx.get(f"{srv.url}/ready", timeout=5)
    refused = httpx.post(f"{srv.url}/v1/images/generations", json={"prompt": PROMPT},
                         timeout=5)
    deadline = time.monotonic() + 120
    view = {}
    while time.monotonic() < deadline:  # the listener stays open while work drains
        view = httpx.get(f"{srv.url}/v1/jobs/{job['id']}", timeout=5).json()
        if view["status"] == "completed":
            break
        time.sleep(0.2)
    reader.join(timeout=120)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "shutting_down"
    assert refused.status_code == 503
    assert view["status"] == "completed" and len(view["result"]["data"]) == 2
    assert stream["status"] == 200
    assert stream["events"][-1]["type"] == "image_generation.completed", stream["events"][-1]
    assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)


def test_work_past_the_drain_timeout_ends_with_an_explicit_error():
    srv = ServerProcess("--threads", "1", "--log-level", "warning", "--drain-timeout-s", "2",
                        "--max-steps", "100", "--queue-share", "1", "--max-queue", "1000")
    srv.wait_ready()
    stream: dict = {}
    plain: dict = {}
    started = threading.Event()

    def post() -> None:
        plain["r"] = httpx.post(f"{srv.url}/v1/images/generations", timeout=120,
                                json={"prompt": PROMPT, "num_inference_steps": 100, "n": 8})

    threads = [threading.Thread(target=read_stream, args=(
        srv.url, {"num_inference_steps": 100, "n": 8, "partial_images": 3}, stream, started)),
        threading.Thread(target=post)]
    for t in threads:
        t.start()
    assert started.wait(60), "the stream never started"
    start = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert time.monotonic() - start < 30
    last = stream["events"][-1]
    assert last["type"] == "error" and last["error"]["code"] == "shutting_down", last
    assert plain["r"].status_code == 503
    assert plain["r"].json()["error"]["code"] == "shutting_down"
