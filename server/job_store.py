"""In-memory async jobs of the all-in-one server (the scaled-out roles keep them in
Redis as well, so any API replica can answer for them)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError
from .submission import OutputSpec, Submission

STATUSES = ("queued", "running", "completed", "failed", "cancelled")


@dataclass
class Job:
    id: str
    sub: Submission
    spec: OutputSpec
    created_at: float = field(default_factory=time.time)
    status: str = "queued"
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    ended_at: float | None = None
    task: asyncio.Task | None = None

    @property
    def final(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")


class JobStore:
    """Ended jobs are kept `ttl_s`, then forgotten."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.jobs: dict[str, Job] = {}

    def add(self, job: Job) -> None:
        self.purge()
        self.jobs[job.id] = job

    def get(self, job_id: str) -> Job:
        self.purge()
        job = self.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no job {job_id!r} (unknown, or its result expired)", "id",
                           "job_not_found")
        return job

    def purge(self) -> None:
        now = time.time()
        for k in [k for k, j in self.jobs.items()
                  if j.ended_at is not None and now - j.ended_at > self.ttl_s]:
            del self.jobs[k]
