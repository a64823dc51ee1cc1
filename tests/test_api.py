"""The HTTP API in-process (httpx over ASGI) with a fake engine."""

import asyncio
import base64
import io
import json
import threading

import httpx
import pytest
from PIL import Image

from fakes import BOOM, FakeEngine, GatedEngine
from stepserve.server.app import create_app
from stepserve.server.settings import Settings


def make_app(engine=None, **settings):
    engine = engine or FakeEngine((3, 8, 8))
    app = create_app(Settings(model="fake", **settings), builder=lambda s: engine)
    app.state.runtime.start(background=False)
    return app


@pytest.fixture
def app():
    app = make_app()
    yield app
    app.state.runtime.shutdown()


def client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def call(app, method, url, **kw):
    async def go():
        async with client(app) as c:
            return await c.request(method, url, **kw)

    return asyncio.run(go())


def gen(app, **body):
    return call(app, "POST", "/v1/images/generations", json={"prompt": "a red circle", **body})


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_health_ready_models_and_metrics(app):
    assert call(app, "GET", "/health").json() == {"status": "ok"}
    assert call(app, "GET", "/ready").status_code == 200
    models = call(app, "GET", "/v1/models").json()
    assert models["data"][0]["id"] == "fake"
    gen(app, num_inference_steps=2)
    text = call(app, "GET", "/metrics").text
    for name in ("stepserve_requests_total", "stepserve_request_latency_seconds",
                 "stepserve_denoiser_batch_size", "stepserve_denoiser_forward_seconds",
                 "stepserve_denoising_steps_total", "stepserve_queue_depth",
                 "stepserve_running_requests", "stepserve_images_generated_total",
                 "stepserve_queue_wait_seconds"):
        assert name in text
    assert 'stepserve_requests_total{status="ok"} 1.0' in text


def test_not_ready_is_503():
    app = create_app(Settings(model="fake"), builder=lambda s: FakeEngine())
    assert call(app, "GET", "/ready").status_code == 503
    r = gen(app)
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_b64_png_response_shape(app):
    r = gen(app, n=2, num_inference_steps=3, seed=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 2 and body["output_format"] == "png" and body["size"] == "8x8"
    assert png(body["data"][0]["b64_json"]).size == (8, 8)
    assert body["usage"]["total_tokens"] > 0
    again = gen(app, n=2, num_inference_steps=3, seed=5).json()
    assert again["data"][0]["b64_json"] == body["data"][0]["b64_json"], "seeded"


def test_url_response_is_served_then_expires():
    app = make_app(url_ttl_s=0.3, allowed_hosts=["test"])
    r = gen(app, response_format="url", output_format="jpeg", size="32x32")
    url = r.json()["data"][0]["url"]
    assert url.startswith("http://test/v1/images/files/") and url.endswith(".jpeg")
    f = call(app, "GET", url)
    assert f.status_code == 200 and f.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(f.content)).size == (32, 32)  # upscaled x4
    import time

    time.sleep(0.4)
    assert call(app, "GET", url).status_code == 404
    app.state.runtime.shutdown()


@pytest.mark.parametrize("body,param", [
    ({"n": 0}, "n"), ({"n": 11}, "n"), ({"size": "big"}, "size"), ({"size": "12x12"}, "size"),
    ({"size": "16x8"}, "size"), ({"response_format": "gif"}, "response_format"),
    ({"output_format": "bmp"}, "output_format"), ({"output_compression": 101},
                                                  "output_compression"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 65}, "num_inference_steps"), ({"guidance_scale": -1},
                                                           "guidance_scale"),
    ({"seed": -3}, "seed"), ({"sampler": "ddim"}, "sampler"), ({"partial_images": 4},
                                                               "partial_images"),
    ({"timeout": 0}, "timeout"), ({"background": "transparent"}, "background"),
    ({"prompt": ""}, "prompt"), ({"bogus_field": 1}, "bogus_field"),
    ({"cache": "bogus"}, "cache"), ({"cache": {"policy": "ab-cache", "order": 9}}, "cache.order"),
    ({"cache": {"policy": "ab-cache", "speed": 2}}, "cache.speed"),
    ({"cache": {"policy": "ab-cache", "order": "x"}}, "cache.order"),
    ({"cache": "first-blocks"}, "cache"),  # the fake engine cannot run DiT blocks
    ({"cache": {"policy": "ab-cache", "order": 2.0}}, "cache.order"),
    ({"timesteps": [900, 500]}, "timesteps"), ({"schedule": "ays"}, "schedule"),
    ({"cache": "deepcache"}, "cache"),  # the fake engine is no U-Net
    ({"cache": {"policy": "lazydit", "gate_threshold": 2}}, "cache.gate_threshold"),
])
def test_bad_fields_get_400_naming_the_field(app, body, param):
    r = gen(app, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_missing_prompt_unknown_model_and_bad_json(app):
    r = call(app, "POST", "/v1/images/generations", json={"n": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = gen(app, model="dall-e-3")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = call(app, "POST", "/v1/images/generations", content=b"{nope",
             headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_engine_failure_fails_request_and_server_keeps_serving(app):
    r = gen(app, prompt=f"{BOOM} now")
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    assert gen(app).status_code == 200


def test_queue_full_is_429_with_retry_after():
    engine = GatedEngine()
    app = make_app(engine, max_queue=1, retry_after_s=3)

    async def go():
        async with client(app) as c:
            first = asyncio.create_task(c.post("/v1/images/generations",
                                               json={"prompt": "a", "num_inference_steps": 2}))
            await asyncio.sleep(0.2)
            second = await c.post("/v1/images/generations", json={"prompt": "b"})
            engine.open()
            return await first, second

    first, second = asyncio.run(go())
    assert second.status_code == 429 and second.headers["retry-after"] == "3"
    assert second.json()["error"]["code"] == "queue_full"
    assert first.status_code == 200
    app.state.runtime.shutdown()


def test_timeout_is_an_error_and_frees_the_slot():
    engine = GatedEngine()
    app = make_app(engine, max_queue=1)

    async def go():
        async with client(app) as c:
            task = asyncio.create_task(c.post("/v1/images/generations", json={
                "prompt": "slow", "num_inference_steps": 50, "timeout": 0.3}))
            await asyncio.sleep(0.5)
            engine.open()
            slow = await task
            ok = await c.post("/v1/images/generations", json={"prompt": "next"})
            return slow, ok

    slow, ok = asyncio.run(go())
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
    assert ok.status_code == 200
    app.state.runtime.shutdown()


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines()
            if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]")]


def test_streaming_partial_images_then_completed(app):
    r = gen(app, stream=True, partial_images=3, num_inference_steps=8, seed=1)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    kinds = [e["type"] for e in events]
    assert kinds == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e["partial_image_index"] for e in events[:3]] == [0, 1, 2]
    assert [e["step"] for e in events[:3]] == [2, 4, 6]
    assert png(events[-1]["b64_json"]).size == (8, 8)
    assert events[-1]["usage"]["total_tokens"] > 0


def test_streaming_error_event(app):
    r = gen(app, stream=True, prompt=f"{BOOM}")
    (event,) = sse_events(r.text)
    assert event["type"] == "error" and event["error"]["code"] == "engine_error"


def test_playground_page(app):
    r = call(app, "GET", "/")
    assert r.status_code == 200 and "stepserve playground" in r.text


def test_cache_field_skips_steps_and_is_counted(app):
    r = gen(app, num_inference_steps=16, cache={"policy": "ab-cache", "interval": 4})
    assert r.status_code == 200, r.text
    metrics = call(app, "GET", "/metrics").text
    skipped = [line for line in metrics.splitlines()
               if line.startswith('stepserve_cache_skipped_steps_total{policy="ab-cache"}')]
    assert skipped and float(skipped[0].split()[-1]) == 16 - 5  # computes 0, 4, 8, 12, 15


def test_exact_result_cache_returns_stored_images_without_a_forward():
    engine = FakeEngine((3, 8, 8))
    app = make_app(engine)
    try:
        first = gen(app, seed=5, num_inference_steps=3)
        forwards = len(engine.batches)
        again = gen(app, seed=5, num_inference_steps=3)
        assert again.status_code == 200 and len(engine.batches) == forwards  # no forward
        assert again.json()["data"] == first.json()["data"]
        gen(app, seed=5, num_inference_steps=2)  # any parameter differs: computed
        gen(app, num_inference_steps=3)  # no seed: never cached
        assert len(engine.batches) == forwards + 2 + 3
        metrics = call(app, "GET", "/metrics").text
        assert 'stepserve_result_cache_lookups_total{outcome="hit"} 1.0' in metrics
        assert 'stepserve_result_cache_lookups_total{outcome="miss"} 2.0' in metrics
    finally:
        app.state.runtime.shutdown()
    off = make_app(FakeEngine((3, 8, 8)), result_cache_mb=0)
    try:
        gen(off, seed=5)
        gen(off, seed=5)
        assert len(off.state.runtime.engine.batches) == 2 * 4
    finally:
        off.state.runtime.shutdown()


def test_server_cache_default_applies_and_is_checked_at_start():
    app = make_app(FakeEngine((3, 8, 8)), cache="ab-cache")
    try:
        # knobs without a policy refine the server's default policy
        assert gen(app, num_inference_steps=16, cache={"interval": 4}).status_code == 200
        metrics = call(app, "GET", "/metrics").text
        assert 'stepserve_cache_skipped_steps_total{policy="ab-cache"} 11.0' in metrics
    finally:
        app.state.runtime.shutdown()
    bad = make_app(FakeEngine((3, 8, 8)), cache="teacache")
    r = call(bad, "GET", "/ready")
    assert r.status_code == 503 and "needs an engine that runs the DiT" in r.text


def test_api_keys_and_per_key_rate_limit():
    app = make_app(FakeEngine((3, 8, 8)), api_keys=["k-alpha", "k-beta"], rate_limit_rps=0.2,
                   rate_limit_burst=2)
    try:
        def post(key=None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return call(app, "POST", "/v1/images/generations", headers=headers,
                        json={"prompt": "a red circle", "num_inference_steps": 1})

        missing, wrong = post(), post("nope")
        assert missing.status_code == wrong.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert call(app, "GET", "/health").status_code == 200  # probes need no key
        assert [post("k-alpha").status_code for _ in range(3)] == [200, 200, 429]
        limited = post("k-alpha")
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert int(limited.headers["retry-after"]) >= 1
        assert post("k-beta").status_code == 200  # buckets are per key
    finally:
        app.state.runtime.shutdown()


def test_several_devices_share_the_load():
    engines = []

    def builder(settings):
        engines.append(GatedEngine())
        engines[-1].open()
        return engines[-1]

    app = create_app(Settings(model="fake", device="cpu,cpu", max_batch_size=2),
                     builder=builder)
    app.state.runtime.start(background=False)

    async def go():
        async with client(app) as c:
            return await asyncio.gather(*(c.post("/v1/images/generations",
                                                 json={"prompt": f"p{i}", "seed": i,
                                                       "num_inference_steps": 8})
                                          for i in range(6)))

    try:
        for e in engines:
            e.close()  # hold both devices so the six requests pile up...
        threading.Timer(0.3, lambda: [e.open() for e in engines]).start()
        rs = asyncio.run(go())
    finally:
        app.state.runtime.shutdown()
    assert len(engines) == 2 and all(r.status_code == 200 for r in rs)
    assert all(sum(e.batches) > 0 for e in engines)  # ...and spread over both
    assert sum(sum(e.batches) for e in engines) == 6 * 8
