"""What travels through Redis: generation parameters as JSON and uint8 image batches as
raw bytes with a shape header (never pickled)."""

from __future__ import annotations

import base64
import json

import numpy as np

from stepserve.models.caches.config import CacheConfig
from stepserve.models.sampling.edit import Edit

from ..scheduler.events import Failed, FinishReason
from ..scheduler.plan import Plan, cache_json
from ..scheduler.request import GenerationParams, LoraChoice


def params_to_json(p: GenerationParams) -> str:
    d = dict(vars(p))  # shallow: the edit's pixels are encoded below, not copied
    d["cache"] = cache_json(p.cache)
    d["edit"] = edit_to_json(p.edit) if p.edit else None
    d["ladder"] = [plan.to_json() for plan in p.ladder]
    d["safe_cache"] = cache_json(p.safe_cache)
    return json.dumps(d)


def edit_to_json(e: Edit) -> dict:
    """An edit's source as raw bytes in base64 (never pickled)."""
    return {"image": base64.b64encode(e.image.tobytes()).decode(), "shape": e.image.shape,
            "strength": e.strength,
            "mask": None if e.mask is None else base64.b64encode(
                np.packbits(e.mask).tobytes()).decode(),
            "more": [base64.b64encode(m.tobytes()).decode() for m in e.more]}


def edit_from_json(d: dict) -> Edit:
    shape = tuple(d["shape"])
    image = np.frombuffer(base64.b64decode(d["image"]), np.uint8).reshape(shape).copy()
    mask = None
    if d.get("mask") is not None:
        bits = np.frombuffer(base64.b64decode(d["mask"]), np.uint8)
        mask = np.unpackbits(bits)[:shape[0] * shape[1]].reshape(shape[:2]).astype(bool)
    more = tuple(np.frombuffer(base64.b64decode(m), np.uint8).reshape(shape).copy()
                 for m in d.get("more", ()))
    return Edit(image, float(d["strength"]), mask, more)


def params_from_json(text: str) -> GenerationParams:
    d = json.loads(text)
    d["cache"] = CacheConfig.parse(d["cache"]) if d.get("cache") else None
    d["edit"] = edit_from_json(d["edit"]) if d.get("edit") else None
    if d.get("schedule"):
        d["schedule"] = tuple((k, tuple(v)) for k, v in d["schedule"])
    d["lora"] = tuple(LoraChoice(*c) for c in d.get("lora") or ())
    d["ladder"] = tuple(Plan.from_json(plan) for plan in d.get("ladder") or ())
    d["safe_cache"] = CacheConfig.parse(d["safe_cache"]) if d.get("safe_cache") else None
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
