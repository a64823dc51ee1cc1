"""Jobs seen from any API replica: status, progress and results read from Redis, so
`GET /v1/jobs/{id}` and `DELETE` work wherever the load balancer sends them."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from fastapi import Request

from ..errors import APIError, failure_body
from ..quality import block
from . import keys
from .client import RedisLoop
from .codec import failure_from_json, images_from_bytes
from .connect import as_backend_errors

FINAL = ("completed", "failed", "cancelled")


@as_backend_errors
def _lookup(rt: Any, job_id: str, owner: str | None
            ) -> tuple[RedisLoop, str, dict[str, str]] | None:
    """The job's record, for its owner only (others: None, answered as 404)."""
    handle_id = job_id.replace("job-", "img-", 1)
    for served in rt.models.values():
        loop = served.loop
        if isinstance(loop, RedisLoop):
            raw = loop.sync.hgetall(keys.job(handle_id))
            if raw and b"spec" in raw:
                meta = {k.decode(): v.decode() for k, v in raw.items()}
                return (loop, handle_id, meta) if meta.get("owner", "") == (owner or "") \
                    else None
    return None


def _status(meta: dict[str, str]) -> str:
    status = meta.get("status", "queued")
    return "cancelled" if meta.get("cancelled") == "1" and status not in FINAL else status


async def remote_view(rt: Any, request: Request, job_id: str, owner: str | None
                      ) -> dict[str, Any] | None:
    from ..generation import OutputSpec
    from ..protocol import ImagesResponse, Usage

    found = _lookup(rt, job_id, owner)
    if found is None:
        return None
    loop, handle_id, meta = found
    status, steps = _status(meta), int(meta.get("steps", 1))
    out: dict[str, Any] = {"id": job_id, "object": "image.job", "status": status,
                           "created_at": int(float(meta.get("created_at", time.time()))),
                           "queue_position": None, "progress": None, "result": None,
                           "error": None}
    if status not in FINAL:
        p = loop.progress(handle_id)
        out.update(status=p.phase, queue_position=p.position,
                   progress={"step": p.step, "total_steps": steps, "fraction": p.step / steps})
    elif status == "completed":
        spec = OutputSpec(**json.loads(meta["spec"]))
        data = await encoded_once(rt, request, loop, handle_id, job_id, spec)
        out["result"] = ImagesResponse(
            created=int(time.time()), data=data, background="opaque",
            output_format=spec.output_format, size=spec.size,
            usage=Usage(**json.loads(meta["usage"])),
            stepserve=_ran(meta.get("outcome"), steps, spec.warnings)
        ).model_dump(exclude_none=True)
        out["progress"] = {"step": steps, "total_steps": steps, "fraction": 1.0}
    elif status == "failed" and meta.get("error"):
        out["error"] = failure_body(failure_from_json(job_id, json.loads(meta["error"])))["error"]
    return out


def _ran(outcome: str | None, steps: int, warnings: Sequence[str] = ()) -> dict[str, Any]:
    """What the worker ran (quality.ran's block), from its stored outcome."""
    d = json.loads(outcome) if outcome else {}
    return block(d.get("quality"), d.get("level"), d.get("steps", steps), d.get("cache"),
                 warnings)


async def encoded_once(rt: Any, request: Request, loop: RedisLoop, handle_id: str,
                       job_id: str, spec: Any) -> list[dict[str, Any]]:
    """The job's images as the API returns them, encoded (and url results minted) once,
    by whichever replica is asked first; every replica then answers the same."""
    from ..generation import image_data

    get = as_backend_errors(loop.sync.get)
    stored = get(keys.encoded(handle_id))
    if stored is not None:
        return json.loads(stored)
    blob = get(keys.result(handle_id))
    meta = as_backend_errors(loop.sync.hget)(keys.job(handle_id), "rcache")
    if blob is None and meta:  # answered from the shared result cache: read it there
        from .result_cache import PREFIX as RCACHE

        blob = get(f"{RCACHE}:{meta.decode()}")
    if blob is None:
        raise APIError(404, f"the result of job {job_id[:64]!r} has expired", "id",
                       "job_not_found")
    data = [d.model_dump(exclude_none=True)
            for d in await image_data(rt, request, images_from_bytes(blob), spec)]
    ttl = int(loop.sync.ttl(keys.job(handle_id)) or 0)
    as_backend_errors(loop.sync.set)(keys.encoded(handle_id), json.dumps(data),
                                     ex=max(1, ttl), nx=True)
    won = get(keys.encoded(handle_id))  # another replica may have been first
    return json.loads(won) if won is not None else data


def remote_cancel(rt: Any, job_id: str, owner: str | None) -> dict[str, Any] | None:
    found = _lookup(rt, job_id, owner)
    if found is None:
        return None
    loop, handle_id, meta = found
    status = _status(meta)
    if status in FINAL:
        raise APIError(409, f"job {job_id!r} has already ended ({status})", "id",
                       "job_already_ended")
    loop.cancel(handle_id)
    return {"id": job_id, "object": "image.job", "status": "cancelled"}
