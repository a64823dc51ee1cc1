"""Production hardening (issue 14), in-process: job and result ownership, key-guess
throttling, the body-size limit, byte bounds of every per-request store, url bases,
and job views."""

import asyncio
import time

import httpx
import pytest

from fakes import FakeEngine, GatedEngine
from stepserve.server.app import create_app
from stepserve.server.results import ResultStore
from stepserve.server.settings import Settings

A, B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}


def make_app(engine=None, **settings):
    engine = engine or FakeEngine((3, 8, 8))
    app = create_app(Settings(model="fake", **settings), builder=lambda s: engine)
    app.state.runtime.start(background=False)
    return app


def run(app, fn):
    async def go():
        transport = httpx.ASGITransport(app=app, client=("10.0.0.7", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            return await fn(c)

    try:
        return asyncio.run(go())
    finally:
        app.state.runtime.shutdown()


async def wait_done(c, job_id, headers=None):
    for _ in range(400):
        r = await c.get(f"/v1/jobs/{job_id}", headers=headers or {})
        if r.json()["status"] in ("completed", "failed", "cancelled"):
            return r
        await asyncio.sleep(0.01)
    raise AssertionError("job did not end")


def test_jobs_and_url_results_belong_to_the_key_that_made_them():
    app = make_app(api_keys=["key-a", "key-b"])

    async def go(c):
        job = (await c.post("/v1/jobs", json={"prompt": "p", "response_format": "url"},
                            headers=A)).json()
        done = await wait_done(c, job["id"], A)
        url = done.json()["result"]["data"][0]["url"]
        return (job["id"], url, await c.get(f"/v1/jobs/{job['id']}", headers=B),
                await c.delete(f"/v1/jobs/{job['id']}", headers=B),
                (await c.get("/v1/jobs", headers=A)).json(),
                (await c.get("/v1/jobs", headers=B)).json(),
                await c.get(url, headers=B), await c.get(url, headers=A), await c.get(url))

    job_id, url, other, cancel, mine, theirs, b_file, a_file, anon = run(app, go)
    assert other.status_code == 404 and cancel.status_code == 404  # as for an unknown id
    assert [j["id"] for j in mine["data"]] == [job_id] and theirs["data"] == []
    assert b_file.status_code == 404 and a_file.status_code == 200
    assert anon.status_code == 401


def test_failed_key_guesses_are_throttled_per_address():
    app = make_app(api_keys=["key-a"], auth_failures_per_min=3)

    async def go(c):
        guesses = [await c.get("/v1/models", headers={"Authorization": f"Bearer g{i}"})
                   for i in range(5)]
        right = await c.get("/v1/models", headers=A)  # the address is throttled now
        return guesses, right

    guesses, right = run(app, go)
    assert [g.status_code for g in guesses] == [401, 401, 401, 429, 429]
    assert right.status_code == 429 and int(right.headers["retry-after"]) >= 1
    assert guesses[-1].json()["error"]["code"] == "too_many_auth_failures"


def test_internal_endpoints_can_require_a_key():
    app = make_app(api_keys=["key-a"], auth_internal=True)

    async def go(c):
        return [(await c.get(p)).status_code for p in ("/metrics", "/openapi.json")] + [
            (await c.get("/metrics", headers=A)).status_code,
            (await c.get("/health")).status_code]

    assert run(app, go) == [401, 401, 200, 200]


def test_bodies_over_the_limit_get_413_before_they_are_read():
    app = make_app(max_body_mb=0.01)  # 10 KB
    big = b'{"prompt": "' + b"x" * 50_000 + b'"}'

    async def chunks():
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    async def go(c):
        declared = await c.post("/v1/images/generations", content=big,
                                headers={"content-type": "application/json"})
        streamed = await c.post("/v1/images/generations", content=chunks(),
                                headers={"content-type": "application/json"})
        small = await c.post("/v1/images/generations", json={"prompt": "p"})
        return declared, streamed, small

    declared, streamed, small = run(app, go)
    assert declared.status_code == 413 and streamed.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200


def test_identical_cache_hit_jobs_share_one_result_and_the_store_is_bounded():
    app = make_app(jobs_max_mb=0.25)  # 256 KB: room for ~100 job records
    store = app.state.runtime.jobs
    body = {"prompt": "p", "seed": 7, "n": 4, "size": "64x64"}

    async def go(c):
        first = (await c.post("/v1/jobs", json=body)).json()["id"]
        await wait_done(c, first)
        ids = [first]
        for _ in range(40):  # the same seeded request: answered from the result cache
            r = await c.post("/v1/jobs", json=body)
            ids.append(r.json()["id"])
        for i in ids:
            await wait_done(c, i)
        shared = all(store.jobs[i].data is store.jobs[first].data for i in ids)
        shared_bytes, one = store.bytes, store.jobs[first].data
        statuses = []
        for _ in range(200):  # a flood nobody fetches: refused once full, never dropped
            statuses.append((await c.post("/v1/jobs", json={**body, "seed": 8})).status_code)
            await asyncio.sleep(0)
        return shared, shared_bytes, one, statuses

    shared, shared_bytes, one, statuses = run(app, go)
    assert shared  # one copy of the images for all 41 jobs
    assert shared_bytes < 41 * 2048 + 2 * len(str(one))
    assert statuses.count(429) > 0 and statuses[0] == 202
    assert store.bytes <= store.max_bytes


def test_fetched_results_make_room_for_new_jobs():
    app = make_app(jobs_max_mb=0.05, max_jobs=5)
    store = app.state.runtime.jobs

    async def go(c):
        out = []
        for i in range(12):  # each result fetched once: the oldest fetched go first
            r = await c.post("/v1/jobs", json={"prompt": "p", "seed": i})
            out.append(r.status_code)
            await wait_done(c, r.json()["id"])
        return out

    assert run(app, go) == [202] * 12
    assert len(store.jobs) <= 5


def test_url_results_of_one_key_cannot_evict_anothers():
    store = ResultStore(ttl_s=60, max_bytes=10_000, per_quota_bytes=3_000)
    victim = store.put(b"v" * 1000, "image/png", "png", "b", "key:b")
    for _ in range(50):  # a flood from another key stays inside that key's quota
        store.put(b"x" * 1000, "image/png", "png", "a", "key:a")
    assert store.get(victim, "b") is not None and store.get(victim, "a") is None
    assert store.bytes <= 4_000
    for q in range(20):  # only when the whole store is full does anyone else's go
        store.put(b"y" * 1000, "image/png", "png", None, f"addr:{q}")
    assert store.bytes <= 10_000


def test_url_results_never_echo_an_untrusted_host():
    def url_for(host_headers, **settings):
        app = make_app(**settings)

        async def go(c):
            r = await c.post("/v1/images/generations", headers=host_headers,
                             json={"prompt": "p", "response_format": "url"})
            return r.json()["data"][0]["url"]

        return run(app, go)

    evil = url_for({"Host": "evil.example"})
    assert "evil" not in evil and evil.startswith("/v1/images/files/")
    assert url_for({}).startswith("http://localhost/v1/images/files/")
    assert url_for({"Host": "evil.example"}, public_base_url="https://img.example.com/"
                   ).startswith("https://img.example.com/v1/images/files/")


def test_job_views_show_queue_position_progress_and_cancellation():
    engine = GatedEngine(timeout=30)
    app = make_app(engine=engine, batching="request", max_batch_size=1)  # one runs, one waits

    async def go(c):
        running = (await c.post("/v1/jobs", json={"prompt": "p", "num_inference_steps": 4})
                   ).json()
        queued = (await c.post("/v1/jobs", json={"prompt": "q", "num_inference_steps": 4})
                  ).json()
        engine.allow(2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            view = (await c.get(f"/v1/jobs/{running['id']}")).json()
            if view["progress"]["step"] >= 2:
                break
            await asyncio.sleep(0.01)
        waiting = (await c.get(f"/v1/jobs/{queued['id']}")).json()
        cancelled = (await c.delete(f"/v1/jobs/{running['id']}")).json()
        again = (await c.get(f"/v1/jobs/{running['id']}")).json()
        engine.open()
        return queued, waiting, cancelled, again

    queued, waiting, cancelled, again = run(app, go)
    assert queued["queue_position"] is not None  # known at once, even before admission
    assert waiting["status"] == "queued" and waiting["queue_position"] == 0
    assert cancelled["status"] == "cancelled" and cancelled["progress"]["step"] >= 2
    assert again["status"] == "cancelled" and again["progress"]["step"] >= 2


def test_prompt_cache_holds_copies_within_its_byte_bound(encoder):
    from stepserve.models.builtin.text import TextEncoder, entry_bytes

    enc = TextEncoder(cache_bytes=20_000)
    enc.encode(["a", "a much longer prompt about a small red circle on a white background",
                "b"])
    for states, pooled in enc._cache.values():
        # a copy owns exactly its own rows, not the padded batch it was cut from
        assert states.untyped_storage().nbytes() == states.numel() * 4
        assert pooled.untyped_storage().nbytes() == pooled.numel() * 4
    assert enc.bytes == sum(entry_bytes(e) for e in enc._cache.values())
    enc.encode([f"prompt number {i}" for i in range(100)])
    assert enc.bytes <= 20_000 and len(enc._cache) < 100


def test_redis_errors_do_not_reveal_its_address():
    redis_client = pytest.importorskip("stepserve.server.redis.client")
    from stepserve.server.scheduler.backend import BackendUnavailable
    from stepserve.server.scheduler.request import GenerationParams

    loop = redis_client.RedisLoop("redis://127.0.0.1:1", "m", 8)

    async def go():
        with pytest.raises(BackendUnavailable) as err:
            loop.submit(GenerationParams("p", 2, 1, 1.0))
        return str(err.value)

    message = asyncio.run(go())
    assert "Redis" in message and "127.0.0.1" not in message and ":1" not in message


def test_one_key_cannot_fill_the_queue_and_429_says_when_to_retry():
    engine = GatedEngine(timeout=30)
    app = make_app(engine=engine, api_keys=["key-a", "key-b"], max_queue=8, queue_share=0.5,
                   default_steps=4)  # 32 image-steps in all, 16 per key

    async def go(c):
        body = {"prompt": "p", "num_inference_steps": 4}
        a = [(await c.post("/v1/jobs", json=body, headers=A)) for _ in range(6)]
        b = await c.post("/v1/jobs", json=body, headers=B)  # a second key still gets in
        big = await c.post("/v1/jobs", json={**body, "n": 8}, headers=B)  # 32: over its share
        engine.open()
        for r in a + [b]:
            if r.status_code == 202:
                await wait_done(c, r.json()["id"], A if r in a else B)
        # the drain rate is measured now: a refusal's Retry-After comes from it (the gate
        # closed again, so nothing finishes while the six are sent)
        engine.close()
        more = [(await c.post("/v1/jobs", json={**body, "num_inference_steps": 4}, headers=A))
                for _ in range(6)]
        engine.open()
        return a, b, big, more, (await c.get("/metrics")).text

    a, b, big, more, metrics = run(app, go)
    from stepserve.server.auth import key_id

    label = f'tenant="key-{key_id(b"key-a")[:8]}"'
    assert f'stepserve_tenant_requests_total{{status="rejected",{label}}}' in metrics
    assert '"key-a"' not in metrics and '"key-b"' not in metrics  # never a raw key
    assert [r.status_code for r in a] == [202] * 4 + [429] * 2  # 4 x 4 = 16 image-steps
    assert "share of the queue" in a[-1].json()["error"]["message"]
    assert b.status_code == 202 and big.status_code == 429
    refused = [r for r in more if r.status_code == 429]
    assert refused and all(int(r.headers["retry-after"]) >= 1 for r in refused)


def test_retry_after_follows_the_measured_drain_rate():
    from stepserve.server.scheduler.admission import Admission
    from stepserve.server.scheduler.backend import QueueFull
    from stepserve.server.scheduler.request import GenerationParams

    adm = Admission(capacity=100, share=0.5)
    adm.rate.observe(0, now=0.0)
    adm.rate.observe(10, now=1.0)  # 10 image-steps per second
    adm.admit("r1", GenerationParams("p", 10, 1, 1.0, n=4, tenant="a"))  # 40
    with pytest.raises(QueueFull) as err:
        adm.admit("r2", GenerationParams("p", 10, 1, 1.0, n=2, tenant="a"))  # 60 > 50
    assert err.value.retry_after == 1.0  # 10 image-steps over its share at 10/s
    adm.admit("r3", GenerationParams("p", 10, 1, 1.0, n=5, tenant="b"))  # b: 50
    with pytest.raises(QueueFull) as err:
        adm.admit("r4", GenerationParams("p", 10, 1, 1.0, n=4, tenant="c"))  # 130 > 100
    assert err.value.retry_after == 3.0
    adm.release("r1")
    adm.admit("r5", GenerationParams("p", 10, 1, 1.0, n=4, tenant="c"))
    assert adm.total == 90


def test_a_body_that_stops_arriving_gets_408():
    app = make_app(body_timeout_s=0.3)

    async def trickle():
        yield b'{"prompt": '
        await asyncio.sleep(1.0)  # then nothing more for longer than the timeout
        yield b'"p"}'

    async def go(c):
        slow = await c.post("/v1/images/generations", content=trickle(),
                            headers={"content-type": "application/json"})
        fine = await c.post("/v1/images/generations", json={"prompt": "p"})
        return slow, fine

    slow, fine = run(app, go)
    assert slow.status_code == 408 and slow.json()["error"]["code"] == "request_timeout"
    assert fine.status_code == 200


# -- found by a review of the hardening work; each failed before its fix ----------------

def test_job_listings_do_not_inline_results_and_without_auth_are_per_address():
    app = make_app()

    async def go():
        async def as_client(addr):
            t = httpx.ASGITransport(app=app, client=(addr, 1))
            return httpx.AsyncClient(transport=t, base_url="http://localhost")

        a, b = await as_client("10.0.0.1"), await as_client("10.0.0.2")
        async with a, b:
            job = (await a.post("/v1/jobs", json={"prompt": "p", "seed": 1})).json()["id"]
            await wait_done(a, job)
            return (await a.get("/v1/jobs")).json(), (await b.get("/v1/jobs")).json()

    try:
        mine, theirs = asyncio.run(go())
    finally:
        app.state.runtime.shutdown()
    assert [j["status"] for j in mine["data"]] == ["completed"]
    assert mine["data"][0]["result"] is None  # fetch results one job at a time
    assert theirs["data"] == []


def test_a_shared_result_is_held_from_admission_so_the_bound_holds():
    from stepserve.server.job_store import Job, JobStore

    store = JobStore(ttl_s=60, max_bytes=20_000, max_jobs=100)
    sub = type("S", (), {})()
    a = Job("a", sub, None)
    store.make_room(1000)
    store.add(a, 1000, "k")
    store.complete(a, [{"b64_json": "x" * 5000}], "k")
    a.status, a.ended_at, a.fetched = "completed", time.time(), True
    b = Job("b", sub, None)
    store.make_room(1000)
    store.add(b, 1000, "k")  # the same result exists: b holds it from now on
    assert b.reserved == 0
    store._evict(10**9)  # a goes (fetched): the shared result must stay for b
    assert "a" not in store.jobs and store.shared("k") is not None
    store.complete(b, [{"b64_json": "y" * 5000}], "k")
    assert b.data[0]["b64_json"] == "x" * 5000 and store.bytes <= store.max_bytes
    assert store.unfetched() == 1  # b ended unread...
    b.status, b.ended_at = "completed", time.time()
    assert store.unfetched(since=time.time() + 1) == 0  # ...before a drain that began later
    running = Job("c", sub, None)
    store.add(running, 0)
    assert store.unfetched(since=time.time() + 1) == 1  # a running job always counts


def test_a_job_whose_record_cannot_be_kept_is_not_left_behind():
    from stepserve.server.scheduler.backend import BackendUnavailable

    engine = GatedEngine(timeout=30)
    app = make_app(engine=engine)
    served = app.state.runtime.default

    def broken(*a, **k):
        raise BackendUnavailable("the job queue (Redis) is unavailable; retry shortly")

    served.loop.remember_job = broken

    async def go(c):
        r = await c.post("/v1/jobs", json={"prompt": "p"})
        await asyncio.sleep(0.2)
        engine.open()
        return r

    r = run(app, go)
    assert r.status_code == 503
    assert app.state.runtime.jobs.jobs == {} and app.state.runtime.jobs.bytes == 0


def test_a_full_job_store_refuses_before_anything_runs():
    engine = GatedEngine(timeout=30)
    app = make_app(engine=engine, max_jobs=1)

    async def go(c):
        first = await c.post("/v1/jobs", json={"prompt": "p"})
        second = await c.post("/v1/jobs", json={"prompt": "q"})
        inflight = app.state.runtime.inflight
        engine.open()
        await wait_done(c, first.json()["id"])
        return second, inflight

    second, inflight = run(app, go)
    assert second.status_code == 429 and inflight == 1  # the refused job never ran


def test_a_progress_phase_never_ends_a_job_without_its_result():
    from stepserve.server.jobs import view
    from stepserve.server.scheduler.backend import Progress

    app = make_app()
    rt = app.state.runtime

    class Finishing:  # a backend that already reports the end (e.g. Redis, before follow)
        def progress(self, _):
            return Progress("completed", 4)

    from stepserve.server.job_store import Job
    from stepserve.server.scheduler.backend import Handle
    from stepserve.server.scheduler.request import GenerationParams
    from stepserve.server.submission import Submission

    sub = Submission(Handle("img-x", GenerationParams("p", 4, 1, 1.0), backend=Finishing()))
    job = Job("job-x", sub, None)
    rt.jobs.add(job, 0)
    out = view(rt, job)
    app.state.runtime.shutdown()
    assert out["status"] == "running" and not job.final and not job.fetched


def test_url_quotas_when_the_whole_store_is_full_the_largest_pays():
    store = ResultStore(ttl_s=60, max_bytes=8_000, per_quota_bytes=3_000)
    victim = store.put(b"v" * 1000, "image/png", "png", "b", "key:b")
    for q in range(4):  # four attacker quotas, each under its own cap, fill the store
        for _ in range(3):
            store.put(b"x" * 1000, "image/png", "png", None, f"addr:{q}")
    assert store.get(victim, "b") is not None and store.bytes <= 8_000


def test_requests_without_a_key_are_not_counted_as_guesses():
    app = make_app(api_keys=["key-a"], auth_failures_per_min=2)

    async def go(c):
        anon = [(await c.get("/v1/models")).status_code for _ in range(5)]
        return anon, (await c.get("/v1/models", headers=A)).status_code

    anon, keyed = run(app, go)
    assert anon == [401] * 5 and keyed == 200


def test_a_draining_server_takes_no_new_work_not_even_cache_hits():
    app = make_app()

    async def go(c):
        body = {"prompt": "p", "seed": 3}
        first = await c.post("/v1/images/generations", json=body)
        app.state.runtime.begin_drain()
        again = await c.post("/v1/images/generations", json=body)
        job = await c.post("/v1/jobs", json=body)
        return first, again, job

    first, again, job = run(app, go)
    assert first.status_code == 200
    assert again.status_code == job.status_code == 503
    assert again.json()["error"]["code"] == "shutting_down"


def test_the_drain_thread_always_lets_the_server_exit():
    import uvicorn

    from stepserve.server.drain import DrainingServer

    class Broken:
        inflight = responses = 0

        def begin_drain(self):
            pass

        def unfetched_jobs(self):
            raise RuntimeError("dictionary changed size during iteration")

    server = DrainingServer(uvicorn.Config(app=None), Broken(), timeout_s=5)
    server._drain()
    assert server.should_exit
