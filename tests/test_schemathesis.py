"""Schemathesis over /openapi.json (slow tier): every operation with generated valid
and invalid requests, then the jobs links (POST /v1/jobs -> GET / DELETE
/v1/jobs/{job_id}) as stateful scenarios, against the in-process app on a fake engine.
No 5xx, every status documented, every body matching its documented schema, every
schema-invalid request refused with a 4xx."""

from __future__ import annotations

import collections
import time
from datetime import timedelta

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import CheckContext
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fakes import FakeEngine
from stepserve.server.app import create_app
from stepserve.server.settings import Settings

pytestmark = pytest.mark.slow

EXAMPLES = 50  # per operation and generation mode; the stateful run takes half as many


class SteadyEngine(FakeEngine):
    """FakeEngine without its failure trigger: a generated prompt containing 'boom'
    must not become the engine error (500) that the fake is built to raise."""

    def encode(self, prompts):
        batch = super().encode(prompts)
        batch.pooled.zero_()
        return batch


def no_server_error(ctx: CheckContext, response, case) -> bool | None:
    """No 5xx, except the 504 a request asks for with its own `timeout`."""
    status = response.status_code
    asked = isinstance(case.body, dict) and case.body.get("timeout") is not None
    if status >= 500 and not (status == 504 and asked):
        raise AssertionError(f"server error {status}: {response.text[:300]}")
    return None


CHECKS = [no_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance, negative_data_rejection]


class WithoutLifespan:
    """The app minus its lifespan: schemathesis's pytest plugin ends an ASGI app's
    lifespan after every test, and a stepserve runtime that drained stays draining
    (as a real server should), so this module starts the runtime once and ends it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"].rsplit(".", 1)[-1]  # startup / shutdown
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await self.app(scope, receive, send)


APP = create_app(Settings(model="fake", max_queue=64), builder=lambda s: SteadyEngine())


def make_schema():
    loaded = schemathesis.openapi.from_dict(APP.openapi())  # no request, no model yet
    loaded.app = WithoutLifespan(APP)
    return loaded


@pytest.fixture(scope="module", autouse=True)
def runtime():
    APP.state.runtime.start(background=False)
    yield APP.state.runtime
    APP.state.runtime.shutdown()


schema = make_schema()
SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES, deadline=timedelta(seconds=10), database=None, derandomize=True,
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking
    suppress_health_check=list(hypothesis.HealthCheck))


@schema.parametrize()
@SETTINGS
def test_every_operation(case):
    checks = CHECKS
    if case.media_type == "multipart/form-data":
        # a form cannot carry some schema-violating values (an empty array is no field
        # at all): such "negative" cases arrive as valid requests
        checks = [c for c in CHECKS if c is not negative_data_rejection]
    case.call_and_validate(checks=checks)


def wait_until_ended(job_id: str, timeout: float = 10.0) -> None:
    """Each job ends before the scenario goes on, so a later DELETE of it is always 409:
    Hypothesis replays scenarios and needs each step's outcome to be the same."""
    jobs, deadline = APP.state.runtime.jobs.jobs, time.monotonic() + timeout
    while (job := jobs.get(job_id)) is not None and not job.final \
            and time.monotonic() < deadline:
        time.sleep(0.005)


def test_jobs_links_statefully():
    """Scenarios that follow the links: a job created, then fetched and cancelled by
    the id the 202 returned (a generated id would only ever get 404)."""
    seen: collections.Counter = collections.Counter()

    class Jobs(schema.as_state_machine()):  # type: ignore[misc]
        def after_call(self, response, case):
            super().after_call(response, case)
            if case.operation.label == "POST /v1/jobs" and response.status_code == 202:
                wait_until_ended(response.json()["id"])

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            seen[case.operation.label, response.status_code] += 1
            case.validate_response(response, checks=CHECKS)

    Jobs.run(settings=hypothesis.settings(SETTINGS, max_examples=EXAMPLES // 2,
                                          stateful_step_count=6, deadline=None))
    assert seen["POST /v1/jobs", 202] and seen["GET /v1/jobs/{job_id}", 200], seen
    assert seen["DELETE /v1/jobs/{job_id}", 409], seen
