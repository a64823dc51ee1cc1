"""What travels through Redis: generation parameters as JSON and uint8 image batches as
raw bytes with a shape header (never pickled)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from stepserve.models.caches.config import CacheConfig

from ..scheduler.events import Failed, FinishReason
from ..scheduler.request import GenerationParams


def params_to_json(p: GenerationParams) -> str:
    d = dataclasses.asdict(p)
    d["cache"] = {"policy": p.cache.policy, **dataclasses.asdict(p.cache)} if p.cache else None
    return json.dumps(d)


def params_from_json(text: str) -> GenerationParams:
    d = json.loads(text)
    d["cache"] = CacheConfig.parse(d["cache"]) if d.get("cache") else None
    if d.get("schedule"):
        d["schedule"] = tuple((k, tuple(v)) for k, v in d["schedule"])
    return GenerationParams(**d)


def images_to_bytes(images: np.ndarray) -> bytes:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError("expected uint8 images (N, H, W, C)")
    return ",".join(map(str, images.shape)).encode() + b"|" + images.tobytes()


def images_from_bytes(blob: bytes) -> np.ndarray:
    head, _, body = blob.partition(b"|")
    shape = tuple(int(v) for v in head.decode().split(","))
    return np.frombuffer(body, dtype=np.uint8).reshape(shape).copy()


def failure_to_json(event: Failed) -> dict:
    """A failed job's stored error and announced event (the API maps the reason to HTTP)."""
    return {"reason": event.reason.value, "code": event.code, "message": event.message}


def failure_from_json(job_id: str, d: dict) -> Failed:
    return Failed(job_id, FinishReason(d.get("reason", FinishReason.ERROR.value)),
                  d.get("message", "the job failed"), d.get("code"))
