"""Faults in the scaled-out roles, with real processes: workers killed (-9) mid-job,
and Redis itself killed and restarted under a running API."""

import shutil
import time

import httpx
import pytest
import redis

from stepserve.loadtests import faults
from stepserve.loadtests.cluster import Cluster
from stepserve.loadtests.redis_server import RedisServer
from stepserve.server.redis import keys

pytestmark = [pytest.mark.slow,  # redis-server, server subprocesses, kill -9
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server is not installed (.ci/run installs it)")]
PROMPT = "a small blue circle at the top right on a white background"


def test_killed_workers_lose_and_duplicate_no_job():
    result = faults.main(["--jobs", "24", "--kills", "1", "--steps", "32", "--timeout", "300"])
    assert result["worker_kills"] == 1 and result["jobs_running_on_killed_workers"] >= 1
    assert result["rerun_jobs"] >= 1  # the killed worker's jobs ran again elsewhere
    assert result["completed"] == 24 and result["lost"] == 0 and result["failed"] == 0
    assert result["duplicated"] == 0 and result["announced_once"] == 24
    assert result["served_by_api"] == 24


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_redis_restart_gives_503_then_the_same_api_recovers():
    with RedisServer(fsync="always") as rs, Cluster(
            rs.url, ("--threads", "1", "--warmup-batch-sizes", "1")) as cl:
        cl.add_worker()
        cl.start_api()
        client = redis.Redis.from_url(rs.url)
        job = httpx.post(f"{cl.url}/v1/jobs", json={
            "prompt": PROMPT, "n": 10, "guidance_scale": 3.0,
            "num_inference_steps": 64}).json()["id"]
        key = keys.job(job.replace("job-", "img-", 1))
        wait_for(lambda: client.hget(key, "status") == b"running", 60, "the job to run")

        rs.kill()
        ready = wait_for(lambda: (r := httpx.get(f"{cl.url}/ready")).status_code == 503 and r,
                         10, "/ready to say 503")
        assert ready.json()["error"]["code"] == "backend_unavailable"
        r = httpx.post(f"{cl.url}/v1/images/generations", json={"prompt": PROMPT})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "backend_unavailable"
        assert "Redis" in r.json()["error"]["message"]
        assert httpx.get(f"{cl.url}/v1/jobs/{job}").status_code == 503
        assert cl.api.poll() is None and cl.workers[0].poll() is None

        rs.start()  # same port, data back from its append-only file
        wait_for(lambda: httpx.get(f"{cl.url}/ready").status_code == 200, 20, "/ready 200")
        view = wait_for(lambda: (v := httpx.get(f"{cl.url}/v1/jobs/{job}").json())["status"]
                        in ("completed", "failed") and v, 120, "the job to end")
        assert view["status"] == "completed" and len(view["result"]["data"]) == 10
        r = httpx.post(f"{cl.url}/v1/images/generations",
                       json={"prompt": PROMPT, "num_inference_steps": 2}, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"]) == 1
        assert cl.api.poll() is None  # recovered without a restart

        rs.kill()  # again, now while the API waits on no job at all
        time.sleep(1.0)
        rs.start()
        wait_for(lambda: httpx.get(f"{cl.url}/ready").status_code == 200, 20, "/ready 200")
        started = time.monotonic()
        with httpx.stream("POST", f"{cl.url}/v1/images/generations", timeout=60, json={
                "prompt": PROMPT, "num_inference_steps": 8, "stream": True,
                "partial_images": 2}) as s:
            kinds = [line.split(":", 1)[1].strip() for line in s.iter_lines()
                     if line.startswith("event:")]
        assert kinds == ["image_generation.partial_image"] * 2 + [
            "image_generation.completed"]  # previews flow again: pub/sub is back
        assert time.monotonic() - started < 4.0  # not via the stored-state fallback (5 s)
