"""What a client sees on the wire (issue 14, "Errors a user sees"): strict request
types, the field named as the client wrote it, echoed values kept short, one message
per out-of-range limit, and an OpenAPI document that lists the statuses the server
answers. In-process (httpx over ASGI) on the fake engine."""

import asyncio

import httpx
import pytest

from fakes import FakeEngine
from stepserve.server.app import create_app
from stepserve.server.settings import Settings


def make_app(**settings):
    engine = FakeEngine((3, 8, 8))
    app = create_app(Settings(model="fake", **settings), builder=lambda s: engine)
    app.state.runtime.start(background=False)
    return app


def call(app, method, url, **kw):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test") as c:
            return await c.request(method, url, **kw)

    return asyncio.run(go())


def gen(app, **body):
    return call(app, "POST", "/v1/images/generations", json={"prompt": "a red circle", **body})


ROUTES = [("/v1/images/generations", "post"), ("/v1/jobs", "post"), ("/v1/jobs", "get"),
          ("/v1/jobs/{job_id}", "get"), ("/v1/jobs/{job_id}", "delete")]


@pytest.fixture(scope="module")
def app():
    app = make_app(max_batch_size=4)
    yield app
    app.state.runtime.shutdown()


@pytest.fixture(scope="module")
def openapi(app):
    return call(app, "GET", "/openapi.json").json()


def error(r, status=400):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("size", ["8x8\n", "８x８", "٨x٨"])
def test_size_takes_ascii_digits_and_nothing_else(app, size):
    err = error(gen(app, size=size))
    assert err["param"] == "size" and "WIDTHxHEIGHT" in err["message"]
    assert gen(app, size="8x8").status_code == 200


@pytest.mark.parametrize("field,value", [
    ("n", "2"), ("n", True), ("stream", "true"), ("stream", 1), ("stream", 0),
    ("seed", "5"), ("priority", "1"), ("num_inference_steps", "2"), ("timeout", "3"),
    ("guidance_scale", True), ("guidance_scale", "2"), ("output_compression", False),
    ("output_compression", "50"),
])
def test_numbers_and_booleans_are_not_coerced(app, field, value):
    err = error(gen(app, **{field: value}))
    assert err["param"].split(".")[0] == field, err


def test_json_numbers_are_taken_as_numbers(app):
    """An integer where a number is expected, and 2.0 where an integer is (JSON Schema
    counts 2.0 as an integer), are the same values, not type errors."""
    r = gen(app, guidance_scale=2, timeout=30, n=2.0, num_inference_steps=2.0, seed=7.0)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2


@pytest.mark.parametrize("raw,param", [(b'{"prompt": "x", "sigmas": [1.0, NaN]}', "sigmas.1"),
                                       (b'{"prompt": "x", "sigmas": [-Infinity]}', "sigmas.0")])
def test_nan_and_infinity_are_refused(app, raw, param):
    """Python's JSON parser takes NaN and Infinity; a list without bounds would pass
    them on to the model."""
    r = call(app, "POST", "/v1/images/generations", content=raw,
             headers={"content-type": "application/json"})
    assert error(r)["param"] == param


@pytest.mark.parametrize("cache", [5, [1], True, 2.5])
def test_a_wrong_type_cache_names_cache(app, cache):
    err = error(gen(app, cache=cache))
    assert err["param"] == "cache", err
    assert err["message"] == "cache: Input should be a valid string or a valid dictionary"


def test_a_bad_cache_knob_names_the_knob(app):
    err = error(gen(app, cache={"policy": "ab-cache", "order": [2]}))
    assert err["param"] == "cache.order", err
    assert error(gen(app, cache={"policy": "ab-cache", "order": True}))["param"] == "cache.order"


def test_echoed_values_are_cut_short(app):
    err = error(gen(app, model="m" * 200), 404)
    assert err["param"] == "model" and "m" * 64 + "..." in err["message"]
    assert len(err["message"]) < 200
    r = gen(app, model="m" * 100_000)  # over the schema's bound: refused, not echoed
    assert error(r)["param"] == "model" and len(r.content) < 500
    r = gen(app, **{"x" * 5000: 1})
    err = error(r)
    assert err["param"] == "x" * 64 + "..." and len(r.content) < 500
    r = gen(app, cache={"policy": "ab-cache", "y" * 60: 1})
    assert error(r)["param"].startswith("cache.y") and len(r.content) < 600


@pytest.mark.parametrize("steps", [65, 100, 101, 10_000, 2**40])
def test_every_step_count_over_the_limit_gets_the_servers_message(app, steps):
    err = error(gen(app, num_inference_steps=steps))
    assert err["param"] == "num_inference_steps"
    assert err["message"] == ("num_inference_steps must be at most 64 on this server "
                              "(max_steps)")


@pytest.mark.parametrize("n", [5, 10, 11, 1000])
def test_every_n_over_the_limit_gets_the_servers_message(app, n):
    for path in ("/v1/images/generations", "/v1/jobs"):
        r = call(app, "POST", path, json={"prompt": "x", "n": n})
        err = error(r)
        assert err["param"] == "n" and err["message"] == "n must be at most 4 on this server"


def test_a_bad_query_parameter_is_named_as_sent(app):
    err = error(call(app, "GET", "/v1/jobs", params={"limit": "0"}))
    assert err["param"] == "limit"


def test_openapi_lists_what_the_server_answers(openapi):
    text = str(openapi)
    assert "422" not in openapi["paths"]["/v1/images/generations"]["post"]["responses"]
    assert "HTTPValidationError" not in text and "'422'" not in text
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    expected = {("/v1/images/generations", "post"): {400, 404, 409, 413, 429, 500, 503, 504},
                ("/v1/jobs", "post"): {400, 404, 413, 429, 503, 504},  # 504: timeout unmeetable
                ("/v1/jobs", "get"): {400},
                ("/v1/jobs/{job_id}", "get"): {404, 503},
                ("/v1/jobs/{job_id}", "delete"): {404, 409, 503},
                ("/ready", "get"): {503},
                ("/v1/images/files/{key}", "get"): {404}}
    for (path, method), statuses in expected.items():
        responses = openapi["paths"][path][method]["responses"]
        errors = {int(s) for s in responses if int(s) >= 400}
        assert errors == statuses, (path, method, errors)
        for s in statuses:
            assert responses[str(s)]["content"]["application/json"]["schema"] == error_ref
    detail = openapi["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    # the 200s say what they are
    generations = openapi["paths"]["/v1/images/generations"]["post"]["responses"]["200"]
    assert set(generations["content"]) == {"application/json", "text/event-stream"}
    files = openapi["paths"]["/v1/images/files/{key}"]["get"]["responses"]["200"]
    assert set(files["content"]) == {"image/png", "image/jpeg", "image/webp"}
    assert set(openapi["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {
        "text/plain"}
    # a created job links to the operations that take its id
    links = openapi["paths"]["/v1/jobs"]["post"]["responses"]["202"]["links"]
    assert {v["operationId"] for v in links.values()} == {"get_job", "cancel_job"}
    assert all(v["parameters"] == {"job_id": "$response.body#/id"} for v in links.values())
    # no 401 without keys
    assert all("401" not in openapi["paths"][p][m]["responses"] for p, m in ROUTES)


def test_openapi_with_keys_lists_401_and_429_on_guarded_routes():
    app = make_app(api_keys=["k"])
    try:
        doc = call(app, "GET", "/openapi.json").json()
    finally:
        app.state.runtime.shutdown()
    for path, method in ROUTES + [("/v1/models", "get")]:
        responses = doc["paths"][path][method]["responses"]
        assert {"401", "429"} <= set(responses), (path, method)
    assert "401" not in doc["paths"]["/health"]["get"]["responses"]


def test_error_bodies_match_the_documented_model(app):
    from stepserve.server.protocol import ErrorResponse

    for r in (gen(app, n="2"), gen(app, model="nope"), call(app, "GET", "/v1/jobs/job-x"),
              call(app, "POST", "/v1/jobs", content=b"{", headers={
                  "content-type": "application/json"})):
        assert r.status_code >= 400
        ErrorResponse.model_validate(r.json(), strict=True)
