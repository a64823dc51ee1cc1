"""The `quality` field through the API (in-process, official openai client): each level
runs the model's preset, the response says what ran, omitting it changes nothing, and
auto on an idle server runs the request as asked."""

import json

import numpy as np
from inprocess import decode, make_app, run, wait_job

from stepserve.models.caches.config import CacheConfig
from stepserve.server.scheduler.offline import generate_offline

PROMPT = "a small blue square in the top left on a black background"
SAFE = {"policy": "ab-cache", "order": 2, "interval": 3}


def test_levels_run_their_presets_and_report_what_ran(engine):
    async def go(client, h):
        out = {}
        for quality in (None, "low", "medium", "high", "hd", "auto"):
            extra = {"seed": 5, "timeout": 60.0}
            kw = {"quality": quality} if quality else {}
            r = await client.images.generate(prompt=PROMPT, extra_body=extra, **kw)
            out[quality] = (r.stepserve, decode(r.data[0].b64_json))
        async with h.stream("POST", "/v1/images/generations", json={
                "prompt": PROMPT, "seed": 5, "quality": "medium", "stream": True}) as s:
            lines = [ln async for ln in s.aiter_lines() if ln.startswith("data:")]
        streamed = json.loads(lines[-1][5:])
        job = (await h.post("/v1/jobs", json={"prompt": PROMPT, "quality": "low"})).json()
        view = await wait_job(h, job["id"])
        return out, streamed, view

    out, streamed, job = run(make_app(engine, result_cache_mb=0), go)
    assert out[None][0] == {"quality": None, "level": None, "steps": 4, "cache": None}
    assert out["low"][0] == {"quality": "low", "level": None, "steps": 2, "cache": None}
    assert out["medium"][0]["steps"] == 8 and out["medium"][0]["cache"] == "ab-cache"
    assert out["high"][0] == {"quality": "high", "level": None, "steps": 8, "cache": None}
    assert out["hd"][0] == out["high"][0]
    assert out["auto"][0] == {"quality": "auto", "level": "asked", "steps": 4, "cache": None}
    assert streamed["type"] == "image_generation.completed"
    assert streamed["stepserve"]["cache"] == "ab-cache"
    assert job["status"] == "completed" and job["result"]["stepserve"]["steps"] == 2
    # the images are the presets' own: equal to offline runs at those plans
    for quality, steps, cache in (("low", 2, None), ("medium", 8, CacheConfig.parse(SAFE)),
                                  ("high", 8, None), (None, 4, None), ("auto", 4, None)):
        want = generate_offline(engine, [PROMPT], [5], steps, cache=cache)[0]
        assert np.abs(out[quality][1].astype(int) - want.astype(int)).max() <= 1, quality
    assert not np.array_equal(out["low"][1], out["high"][1])


def test_a_prompt_outside_the_vocabulary_is_served_with_a_warning(engine):
    async def go(client, h):
        before = (await h.get("/metrics")).text
        odd = await client.images.generate(prompt="a cat on a sofa", extra_body={"seed": 1})
        fine = await client.images.generate(prompt=PROMPT, extra_body={"seed": 1})
        after = (await h.get("/metrics")).text
        models = (await h.get("/v1/models")).json()["data"]
        return odd, fine, before, after, models

    odd, fine, before, after, models = run(make_app(engine), go)
    assert odd.data[0].b64_json  # served, never refused
    assert "names nothing this model knows" in odd.stepserve["warnings"][0]
    assert "warnings" not in fine.stepserve
    count = "stepserve_prompt_out_of_vocabulary_total"
    assert f"{count} 0.0" in before and f"{count} 1.0" in after
    assert {"circle", "square", "triangle", "red", "top", "small"} <= set(
        models[0]["vocabulary"])
