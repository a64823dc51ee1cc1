"""The async jobs API in the all-in-one server (in-process, fake engine)."""

import asyncio

import httpx

from fakes import BOOM, FakeEngine, GatedEngine
from stepserve.server.app import create_app
from stepserve.server.settings import Settings


def run(engine, scenario, **settings):
    app = create_app(Settings(model="fake", **settings), builder=lambda s: engine)
    app.state.runtime.start(background=False)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test") as c:
            return await scenario(c)

    try:
        return asyncio.run(go())
    finally:
        app.state.runtime.shutdown()


async def wait_for(c, job_id, status, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        body = (await c.get(f"/v1/jobs/{job_id}")).json()
        if body["status"] == status or asyncio.get_running_loop().time() > deadline:
            return body
        await asyncio.sleep(0.02)


def test_job_runs_to_completion_with_progress_and_result():
    async def scenario(c):
        r = await c.post("/v1/jobs", json={"prompt": "a red circle", "num_inference_steps": 3})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["id"].startswith("job-") and job["status"] in ("queued", "running")
        done = await wait_for(c, job["id"], "completed")
        return done

    done = run(FakeEngine((3, 8, 8)), scenario)
    assert done["status"] == "completed" and done["progress"]["fraction"] == 1.0
    assert done["result"]["data"][0]["b64_json"] and done["error"] is None


def settled(views) -> bool:
    """Six jobs, one forward done and the second one held at the gate: the first four
    admitted and running (one step between them), the last two queued in order."""
    return ([v["status"] for v in views] == ["running"] * 4 + ["queued"] * 2
            and sum(v["progress"]["step"] for v in views[:4]) == 1
            and [v["queue_position"] for v in views[4:]] == [0, 1])


def test_queue_position_progress_and_cancel():
    engine = GatedEngine(timeout=30)  # longer than the polling below: no forward slips by

    async def scenario(c):
        ids = []
        for _ in range(6):  # batch 1 admits up to 4 running; two wait in the queue
            r = await c.post("/v1/jobs", json={"prompt": "p", "num_inference_steps": 4})
            ids.append(r.json()["id"])
        # the first job's first forward is blocked: the others wait in the inbox; one step
        # later they are admitted (up to 4 running with batch 1), two stay queued. The
        # second forward then waits at the gate, so that state holds until released.
        engine.allow(1)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:
                views = [(await c.get(f"/v1/jobs/{i}")).json() for i in ids]
                if settled(views) or loop.time() > deadline:
                    break
                await asyncio.sleep(0.02)
            forwards = len(engine.batches)
            cancel_queued = await c.delete(f"/v1/jobs/{ids[5]}")
            cancel_running = await c.delete(f"/v1/jobs/{ids[0]}")
            again = await c.delete(f"/v1/jobs/{ids[0]}")
        finally:
            engine.open()
        done = [await wait_for(c, i, "completed") for i in ids[1:5]]
        missing = await c.get("/v1/jobs/job-nope")
        return views, forwards, cancel_queued, cancel_running, again, done, missing

    views, forwards, cq, cr, again, done, missing = run(engine, scenario, max_batch_size=1,
                                                        max_queue=8, queue_share=1.0)
    assert [v["status"] for v in views] == ["running"] * 4 + ["queued"] * 2, views
    assert sum(v["progress"]["step"] for v in views[:4]) == 1  # one forward so far
    assert [v["queue_position"] for v in views[4:]] == [0, 1]
    assert forwards == 1  # the gate let exactly one forward through while we looked
    assert cq.json()["status"] == "cancelled" and cr.json()["status"] == "cancelled"
    assert again.status_code == 409 and again.json()["error"]["param"] == "id"
    assert all(d["status"] == "completed" for d in done)
    # the four finished jobs ran 16 forwards; the cancelled running one at most 2 (1 + one
    # more step before it left), the cancelled queued one none: not 24
    assert 16 <= len(engine.batches) <= 18 and engine.timed_out == 0
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


def test_failed_job_and_bad_bodies():
    async def scenario(c):
        bad = await c.post("/v1/jobs", json={"prompt": "x", "stream": True})
        steps = await c.post("/v1/jobs", json={"prompt": "x", "num_inference_steps": 0})
        r = await c.post("/v1/jobs", json={"prompt": f"{BOOM} circle"})
        failed = await wait_for(c, r.json()["id"], "failed")
        return bad, steps, failed

    bad, steps, failed = run(FakeEngine((3, 8, 8)), scenario)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream"
    assert steps.status_code == 400 and steps.json()["error"]["param"] == "num_inference_steps"
    assert failed["status"] == "failed" and failed["error"]["code"] == "engine_error"
    assert failed["result"] is None
