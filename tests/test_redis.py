"""Scale-out over a real Redis: `stepserve api` and `stepserve worker` subprocesses, the
official openai client, streaming, cancellation, and a worker killed mid-job whose job
another worker re-runs."""

import shutil
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import redis

from server_process import ServerProcess, free_port

pytestmark = [pytest.mark.slow,  # redis-server and `stepserve api`/`worker` subprocesses
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server is not installed (.ci/run installs it)")]
PROMPT = "a large yellow triangle at the bottom left on a blue background"


@pytest.fixture(scope="module")
def redis_url():
    port = free_port()
    subprocess.run(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                    "--appendonly", "no", "--daemonize", "yes"], check=True)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(50):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    yield url
    subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], check=False)


def worker(redis_url, *args):
    return subprocess.Popen([sys.executable, "-m", "stepserve.cli", "worker", "--redis-url",
                             redis_url, "--threads", "1", "--warmup-batch-sizes", "1",
                             "--metrics-port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def cluster(redis_url):
    metrics_port = free_port()
    w = worker(redis_url, "--metrics-port", str(metrics_port), "--host", "127.0.0.1")
    w.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    api = ServerProcess("--redis-url", redis_url, role="api")
    api.wait_ready()
    yield api, w
    api.stop()
    w.send_signal(signal.SIGTERM)
    w.wait(timeout=60)


def test_openai_client_through_api_and_worker(cluster):
    api, steady = cluster
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["builtin"]
    r = client.images.generate(model="builtin", prompt=PROMPT, response_format="b64_json",
                               extra_body={"num_inference_steps": 2, "seed": 1})
    assert r.data[0].b64_json
    events = list(client.images.generate(prompt=PROMPT, stream=True, partial_images=2,
                                         extra_body={"num_inference_steps": 6}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"]
    bad = httpx.post(f"{api.url}/v1/images/generations",
                     json={"prompt": "x", "cache": "deepcache"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache"
    worker_metrics = httpx.get(steady.metrics_url).text  # the worker's own /metrics
    assert "stepserve_ready 1.0" in worker_metrics
    assert "stepserve_denoising_steps_total" in worker_metrics
    assert "stepserve_preemptions_total" in worker_metrics  # the worker's core: the same
    assert "stepserve_live_state_bytes" in worker_metrics


def test_quality_runs_on_the_worker_and_the_response_says_what_ran(cluster):
    api, _ = cluster
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    r = client.images.generate(prompt=PROMPT, quality="medium", extra_body={"seed": 2})
    assert r.stepserve == {"quality": "medium", "level": None, "steps": 8,
                           "cache": "ab-cache"}
    r = client.images.generate(prompt=PROMPT, quality="auto", extra_body={"timeout": 60.0})
    assert r.stepserve["level"] == "asked"  # the worker planned it: an idle server
    job = httpx.post(f"{api.url}/v1/jobs", json={"prompt": PROMPT, "quality": "low"}).json()
    for _ in range(300):
        view = httpx.get(f"{api.url}/v1/jobs/{job['id']}").json()
        if view["status"] in ("completed", "failed"):
            break
        time.sleep(0.05)
    assert view["result"]["stepserve"] == {"quality": "low", "level": None, "steps": 2,
                                           "cache": None}


def test_the_api_refuses_what_the_workers_cannot_finish_in_time(redis_url, cluster):
    api, _ = cluster
    body = {"prompt": PROMPT, "num_inference_steps": 8}
    assert httpx.post(f"{api.url}/v1/images/generations", json=body,
                      timeout=60).status_code == 200  # the worker has measured forwards
    r = redis.Redis.from_url(redis_url)
    for _ in range(40):  # its load report (every 0.25 s) carries them
        if any(b'"ema": {"' in v for v in r.hvals("stepserve:load:builtin")):
            break
        time.sleep(0.25)
    before = r.xlen("stepserve:queue:builtin")
    late = httpx.post(f"{api.url}/v1/images/generations", json={**body, "timeout": 0.01},
                      timeout=60)
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_unreachable"
    assert r.xlen("stepserve:queue:builtin") == before  # refused before it was queued
    ok = httpx.post(f"{api.url}/v1/images/generations", json={**body, "timeout": 30.0},
                    timeout=60)
    assert ok.status_code == 200


def test_killed_worker_job_is_rerun_by_another(redis_url, cluster):
    import socket

    api, steady = cluster
    client = redis.Redis.from_url(redis_url)
    steady.send_signal(signal.SIGSTOP)  # only the doomed worker may take the job
    doomed = worker(redis_url, "--visibility-timeout-s", "2")
    rescuer = None
    try:
        with httpx.Client(timeout=300) as c:
            job = c.post(f"{api.url}/v1/jobs", json={"prompt": PROMPT, "n": 4,
                                                     "num_inference_steps": 64}).json()["id"]
            key = f"stepserve:job:{job.replace('job-', 'img-', 1)}"
            for _ in range(1200):
                if client.hget(key, "status") == b"running":
                    break
                time.sleep(0.1)
            assert client.hget(key, "worker").decode() == f"{socket.gethostname()}-{doomed.pid}"
            doomed.kill()  # dies mid-job: its stream entry stays pending, unacknowledged
            doomed.wait()
            rescuer = worker(redis_url, "--visibility-timeout-s", "2")
            for _ in range(1500):
                view = c.get(f"{api.url}/v1/jobs/{job}").json()
                if view["status"] in ("completed", "failed"):
                    break
                time.sleep(0.2)
        assert view["status"] == "completed", view
        assert len(view["result"]["data"]) == 4
        assert client.hget(key, "worker").decode() == f"{socket.gethostname()}-{rescuer.pid}"
    finally:
        steady.send_signal(signal.SIGCONT)
        for w in (doomed, rescuer):
            if w is not None and w.poll() is None:
                w.kill()


def test_cancelled_queued_job_is_never_run(redis_url, cluster):
    api, steady = cluster
    client = redis.Redis.from_url(redis_url)
    steady.send_signal(signal.SIGSTOP)
    try:
        job = httpx.post(f"{api.url}/v1/jobs", json={"prompt": PROMPT}).json()["id"]
        key = f"stepserve:job:{job.replace('job-', 'img-', 1)}"
        for _ in range(50):  # the API puts it on the stream from a background task
            if client.hget(key, "entry"):
                break
            time.sleep(0.05)
        queued = httpx.get(f"{api.url}/v1/jobs/{job}").json()
        assert queued["status"] == "queued" and queued["queue_position"] == 0, queued
        assert httpx.delete(f"{api.url}/v1/jobs/{job}").json()["status"] == "cancelled"
    finally:
        steady.send_signal(signal.SIGCONT)
    for _ in range(300):  # the resumed worker meets the entry and drops it
        if client.hget(key, "status") == b"cancelled":
            break
        time.sleep(0.1)
    assert client.hget(key, "status") == b"cancelled", client.hgetall(key)
    assert client.get(key.replace(":job:", ":result:")) is None


def test_rate_limit_bucket_is_shared_through_redis(redis_url):
    from stepserve.server.redis.rate_limit import RedisBuckets

    a, b = RedisBuckets(redis_url, 0.5, 2), RedisBuckets(redis_url, 0.5, 2)  # two replicas
    assert a.take("key1") == 0 and b.take("key1") == 0
    wait = a.take("key1")
    assert 0 < wait <= 2.0
    assert b.take("key2") == 0


def test_result_cache_in_redis_is_shared_bounded_and_exact(redis_url, cluster):
    import numpy as np

    from stepserve.server.redis.result_cache import RedisResultCache

    small = RedisResultCache(redis_url, max_bytes=3000, ttl_s=60)
    images = np.full((1, 32, 32, 3), 7, np.uint8)  # 3072 + header bytes: over the bound
    small.put("too-big", images)
    assert small.get("too-big") is None
    one = np.full((1, 16, 16, 3), 1, np.uint8)  # ~780 bytes each
    for k in range(5):
        small.put(f"k{k}", one + k)
    assert small.get("k0") is None and small.get("k4") is not None  # oldest evicted
    assert int(small.client.get("stepserve:rcache:bytes")) <= 3000
    # through the API role: a seeded repeat is answered without a worker
    api, _ = cluster
    body = {"prompt": PROMPT, "seed": 77, "num_inference_steps": 2}
    first = httpx.post(f"{api.url}/v1/images/generations", json=body, timeout=120).json()
    again = httpx.post(f"{api.url}/v1/images/generations", json=body, timeout=120).json()
    assert first["data"] == again["data"]
    metrics = httpx.get(f"{api.url}/metrics").text
    assert 'stepserve_result_cache_lookups_total{outcome="hit"} 1.0' in metrics


def test_any_api_replica_answers_for_a_job(redis_url, cluster):
    api, _ = cluster
    other = ServerProcess("--redis-url", redis_url, role="api")
    other.wait_ready()
    try:
        job = httpx.post(f"{api.url}/v1/jobs", json={"prompt": PROMPT, "n": 2,
                                                     "num_inference_steps": 3}).json()["id"]
        for _ in range(600):
            view = httpx.get(f"{other.url}/v1/jobs/{job}").json()
            if view["status"] in ("completed", "failed"):
                break
            time.sleep(0.1)
        assert view["status"] == "completed" and len(view["result"]["data"]) == 2
        assert view["result"]["usage"]["output_tokens"] == 2 * 32 * 32 // 16
        again = httpx.delete(f"{other.url}/v1/jobs/{job}")
        assert again.status_code == 409 and again.json()["error"]["param"] == "id"
        assert httpx.get(f"{other.url}/v1/jobs/job-missing").status_code == 404
    finally:
        other.stop()


def test_running_job_cancelled_from_the_api_leaves_the_worker(redis_url, cluster):
    api, steady = cluster
    client = redis.Redis.from_url(redis_url)
    job = httpx.post(f"{api.url}/v1/jobs", json={
        "prompt": PROMPT, "n": 10, "guidance_scale": 3.0, "num_inference_steps": 64}).json()["id"]
    key = f"stepserve:job:{job.replace('job-', 'img-', 1)}"
    for _ in range(600):  # ~9 s of work on one thread: cancel it early on
        if int(client.hget(key, "step") or 0) >= 2:
            break
        time.sleep(0.05)
    assert client.hget(key, "status") == b"running"
    assert httpx.delete(f"{api.url}/v1/jobs/{job}").json()["status"] == "cancelled"
    for _ in range(60):  # the worker's batch drops it at its next step
        if "stepserve_running_requests 0.0" in httpx.get(steady.metrics_url).text:
            break
        time.sleep(0.05)
    assert "stepserve_running_requests 0.0" in httpx.get(steady.metrics_url).text
    step = int(client.hget(key, "step"))
    time.sleep(1.0)
    assert client.hget(key, "status") == b"cancelled" and step < 64
    assert int(client.hget(key, "step")) == step  # no longer advancing
    assert client.get(key.replace(":job:", ":result:")) is None
    assert httpx.get(f"{api.url}/v1/jobs/{job}").json()["status"] == "cancelled"


def test_many_waiting_jobs_share_a_few_redis_connections(redis_url, cluster):
    api, steady = cluster
    client = redis.Redis.from_url(redis_url)
    before = len(client.client_list())
    steady.send_signal(signal.SIGSTOP)  # all of them wait at once
    try:
        with httpx.Client(timeout=60) as c:
            jobs = [c.post(f"{api.url}/v1/jobs", json={"prompt": PROMPT, "seed": i,
                                                       "num_inference_steps": 1}).json()["id"]
                    for i in range(150)]
        time.sleep(0.5)
        assert len(client.client_list()) - before < 10  # not one connection per job
    finally:
        steady.send_signal(signal.SIGCONT)
    with httpx.Client(timeout=60) as c:
        for job in jobs:
            for _ in range(600):
                view = c.get(f"{api.url}/v1/jobs/{job}").json()
                if view["status"] == "completed":
                    break
                time.sleep(0.1)
            assert view["status"] == "completed", view


def test_api_keys_and_rate_limits_are_shared_by_api_replicas(redis_url, cluster):
    env = {"STEPSERVE_API_KEYS": '["k-one"]', "STEPSERVE_RATE_LIMIT_RPS": "0.05",
           "STEPSERVE_RATE_LIMIT_BURST": "2"}
    replicas = [ServerProcess("--redis-url", redis_url, role="api", env=env) for _ in range(2)]
    try:
        for r in replicas:
            r.wait_ready()
        a, b = (r.url for r in replicas)
        denied = httpx.get(f"{a}/v1/models")
        assert denied.status_code == 401
        assert denied.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{b}/v1/models", headers={"Authorization": "Bearer nope"}
                         ).status_code == 401
        key = {"Authorization": "Bearer k-one"}
        assert httpx.get(f"{a}/v1/models", headers=key).status_code == 200
        assert httpx.get(f"{b}/v1/models", headers=key).status_code == 200  # burst of 2 spent
        limited = httpx.get(f"{a}/v1/models", headers=key)  # one bucket for both replicas
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for r in replicas:
            r.stop()



def test_job_cancelled_through_another_replica_ends_on_its_own(redis_url, cluster):
    api, steady = cluster
    other = ServerProcess("--redis-url", redis_url, role="api")
    other.wait_ready()
    steady.send_signal(signal.SIGSTOP)  # keep it queued
    try:
        job = httpx.post(f"{api.url}/v1/jobs", json={"prompt": PROMPT}).json()["id"]
        time.sleep(0.3)
        assert httpx.delete(f"{other.url}/v1/jobs/{job}").json()["status"] == "cancelled"
        for _ in range(100):  # the creating replica's own wait ends too (not leaked)
            metrics = httpx.get(f"{api.url}/metrics").text
            if 'stepserve_requests_total{status="cancelled"}' in metrics:
                break
            time.sleep(0.1)
        assert 'stepserve_requests_total{status="cancelled"}' in metrics
        assert httpx.get(f"{api.url}/v1/jobs/{job}").json()["status"] == "cancelled"
    finally:
        steady.send_signal(signal.SIGCONT)
        other.stop()


def test_concurrent_requests_each_hear_their_end_promptly(cluster):
    import asyncio

    api, _ = cluster

    async def one(c, i):
        t0 = time.monotonic()
        r = await c.post(f"{api.url}/v1/images/generations",
                         json={"prompt": PROMPT, "num_inference_steps": 1})
        assert r.status_code == 200
        return time.monotonic() - t0

    async def burst():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(one(c, i) for i in range(24)))

    waits = asyncio.run(burst())
    assert max(waits) < 4.0, waits  # every subscription made before its job ran


def test_job_scripts_enqueue_once_and_give_up_on_a_job_that_kills_workers(redis_url):
    import json

    from stepserve.server.redis import keys, scripts

    r = redis.Redis.from_url(redis_url)
    stream, job = keys.queue("scripts-test"), keys.job("img-scripts-test")
    r.delete(stream, job)
    r.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
    enqueue = r.register_script(scripts.ENQUEUE)
    args = ["scripts-test", 4, 0.0, "img-scripts-test", "{}", 1000]
    first = enqueue(keys=[job, stream], args=args)
    assert enqueue(keys=[job, stream], args=args) == first  # a retry queues nothing more
    assert r.xlen(stream) == 1 and r.hget(job, "entry") == first
    (_, [(entry, _)]), = r.xreadgroup(keys.GROUP, "w1", {stream: ">"}, count=1)
    start = r.register_script(scripts.START)
    error = {"status": 500, "code": "worker_crashed", "message": "gave up"}
    start_args = [keys.GROUP, entry, "w1", 3, 1.0, json.dumps(error),
                  json.dumps({"type": "failed", **error}), 60]
    channel = [job, stream, keys.events("img-scripts-test")]
    for _ in range(3):  # three workers took it and died
        assert start(keys=channel, args=start_args) == b"run"
    assert start(keys=channel, args=start_args) == b"crashed"
    assert r.hget(job, "status") == b"failed"
    assert json.loads(r.hget(job, "error"))["code"] == "worker_crashed"
    assert r.xpending(stream, keys.GROUP)["pending"] == 0  # acknowledged: not retried


def finished(url: str, job: str) -> dict:
    """Poll a job through an API replica until it ends."""
    for _ in range(600):
        view = httpx.get(f"{url}/v1/jobs/{job}").json()
        if view["status"] in ("completed", "failed"):
            return view
        time.sleep(0.05)
    raise AssertionError("job did not end")


def test_results_are_the_same_from_any_api_replica(redis_url, cluster):
    api, _ = cluster
    other = ServerProcess("--redis-url", redis_url, role="api")
    other.wait_ready()

    try:
        # a url result made through one replica is served by the other
        r = httpx.post(f"{api.url}/v1/images/generations", timeout=120,
                       json={"prompt": PROMPT, "response_format": "url",
                             "num_inference_steps": 2})
        path = r.json()["data"][0]["url"].split("/v1/", 1)[1]
        a, b = httpx.get(f"{api.url}/v1/{path}"), httpx.get(f"{other.url}/v1/{path}")
        assert a.status_code == b.status_code == 200 and a.content == b.content
        # a job answered from the shared result cache is readable on the other replica
        body = {"prompt": PROMPT, "seed": 4242, "num_inference_steps": 2,
                "response_format": "url"}
        first = httpx.post(f"{api.url}/v1/jobs", json=body).json()["id"]
        assert finished(api.url, first)["status"] == "completed"
        hit = httpx.post(f"{api.url}/v1/jobs", json=body).json()["id"]
        seen = httpx.get(f"{other.url}/v1/jobs/{hit}")
        assert seen.status_code == 200, seen.text
        # polling a finished job: the same answer from either replica, every time (its
        # images encoded and its urls minted once, not per poll)
        views = [finished(u, hit) for u in (other.url, api.url, other.url)]
        assert all(v["status"] == "completed" for v in views)
        assert views[0]["result"]["data"] == views[1]["result"]["data"] == \
            views[2]["result"]["data"]
    finally:
        other.stop()


def test_api_role_keeps_no_results_locally_and_copies_nothing_per_cache_hit(redis_url, cluster):
    small = ServerProcess("--redis-url", redis_url, "--max-jobs", "3", role="api")
    small.wait_ready()
    client = redis.Redis.from_url(redis_url)

    try:
        for i in range(6):  # read each to its end: the store makes room, never a 429
            r = httpx.post(f"{small.url}/v1/jobs", json={"prompt": PROMPT, "seed": 900 + i,
                                                         "num_inference_steps": 2})
            assert r.status_code == 202, r.text
            assert finished(small.url, r.json()["id"])["status"] == "completed"
        results = len(client.keys("stepserve:result:*"))
        for _ in range(4):  # cache hits point at the shared cache: no copy of the images
            r = httpx.post(f"{small.url}/v1/jobs", json={"prompt": PROMPT, "seed": 900,
                                                         "num_inference_steps": 2})
            assert finished(small.url, r.json()["id"])["status"] == "completed"
        assert len(client.keys("stepserve:result:*")) == results
        files = len(client.keys("stepserve:files:file:*"))
        r = httpx.post(f"{small.url}/v1/jobs", json={"prompt": PROMPT, "seed": 950, "n": 2,
                                                     "num_inference_steps": 2,
                                                     "response_format": "url"})
        first = finished(small.url, r.json()["id"])
        assert finished(small.url, r.json()["id"])["result"]["data"] == first["result"]["data"]
        assert len(client.keys("stepserve:files:file:*")) - files == 2  # minted once
    finally:
        small.stop()


def test_lora_adapters_announced_by_workers_are_checked_and_applied(cluster):
    api, _ = cluster
    listed = {d["id"]: d for d in httpx.get(f"{api.url}/v1/loras").json()["data"]}
    assert listed["night"]["models"] == ["builtin"] and listed["mirror"]["rank"] > 0
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    body = {"num_inference_steps": 4, "seed": 3}
    prompt = "a small red circle in the center on a white background"
    plain, night = (client.images.generate(prompt=prompt, response_format="b64_json",
                                           extra_body={**body, **extra}).data[0].b64_json
                    for extra in ({}, {"lora": [{"name": "night"}]}))
    assert plain != night  # the result cache keys on the adapter too
    missing = httpx.post(f"{api.url}/v1/images/generations",
                         json={"prompt": prompt, "lora": [{"name": "nope"}]})
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "lora[0].name"
    assert httpx.post(f"{api.url}/v1/loras/reload").json()["data"]
