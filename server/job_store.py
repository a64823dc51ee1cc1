"""In-memory async jobs of the all-in-one server, bounded in bytes and count (the
scaled-out roles keep them in Redis as well, so any API replica can answer for them).

Every job reserves room for its largest possible result when it is created, so the
bound holds while jobs run. Identical results (the same exact-cache key and output
format) are kept once and shared by every job that returns them. When the store is
full, ended jobs whose results were already fetched go first; if that is not enough,
a new job is refused (429) rather than an unfetched result dropped.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError
from .submission import OutputSpec, Submission

STATUSES = ("queued", "running", "completed", "failed", "cancelled")
JOB_OVERHEAD = 2048  # bytes a job's own bookkeeping is counted as


@dataclass
class Job:
    id: str
    sub: Submission
    spec: OutputSpec
    owner: str | None = None  # the creating API key's id (None: no auth)
    quota: str = ""  # the creator's key or client address (lists without auth)
    created_at: float = field(default_factory=time.time)
    status: str = "queued"
    result: dict[str, Any] | None = None  # the images response without its `data`
    data: list[dict[str, Any]] | None = None  # possibly shared with other jobs
    content_key: str | None = None
    error: dict[str, Any] | None = None
    ended_at: float | None = None
    task: asyncio.Task | None = None
    reserved: int = 0
    fetched: bool = False
    last_step: int = 0

    @property
    def final(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")


def result_bytes(data: list[dict[str, Any]]) -> int:
    return sum(len(v) for d in data for v in d.values() if isinstance(v, str))


class JobStore:
    def __init__(self, ttl_s: float, max_bytes: int = 256 * 2**20,
                 max_jobs: int = 10000) -> None:
        self.ttl_s, self.max_bytes, self.max_jobs = ttl_s, max_bytes, max_jobs
        self.jobs: dict[str, Job] = {}
        self._shared: dict[str, tuple[list[dict[str, Any]], int, int]] = {}  # data, bytes, refs
        self.bytes = 0

    # -- admission --------------------------------------------------------------------
    def make_room(self, reserve: int) -> None:
        """Check (before anything is submitted) that a job reserving `reserve` bytes fits,
        evicting what may go; 429 when it does not. Nothing awaits between this and `add`
        on the event loop, so the room is still there."""
        need = JOB_OVERHEAD + reserve
        self.purge()
        if len(self.jobs) >= self.max_jobs or self.bytes + need > self.max_bytes:
            self._evict(need)
        if len(self.jobs) >= self.max_jobs or self.bytes + need > self.max_bytes:
            raise APIError(429, f"the job store is full ({len(self.jobs)} jobs, "
                           f"{self.bytes / 2**20:.0f} of {self.max_bytes / 2**20:.0f} MB): "
                           "fetch finished jobs' results, or retry later", None,
                           "job_store_full", {"Retry-After": "5"})

    def add(self, job: Job, reserve: int, content_key: str | None = None) -> None:
        """Keep `job`, reserving `reserve` bytes for its result (call make_room first). A
        job that will return an already-stored shared result holds a reference to it from
        now on, so the result cannot be dropped before the job ends."""
        if content_key is not None and content_key in self._shared:
            data, size, refs = self._shared[content_key]
            self._shared[content_key] = (data, size, refs + 1)
            job.content_key, reserve = content_key, 0
        job.reserved = reserve
        self.bytes += JOB_OVERHEAD + reserve
        self.jobs[job.id] = job

    def remove(self, job: Job) -> None:
        """Forget a job that could not be started after all."""
        if job.id in self.jobs:
            self._drop(job)

    def has_shared(self, content_key: str | None) -> bool:
        return content_key is not None and content_key in self._shared

    def shared(self, content_key: str | None) -> list[dict[str, Any]] | None:
        entry = self._shared.get(content_key) if content_key else None
        return entry[0] if entry else None

    def complete(self, job: Job, data: list[dict[str, Any]], content_key: str | None) -> None:
        """The job's images: replaces its reservation with their real (shared) size."""
        if job.id not in self.jobs:  # evicted or purged meanwhile: keep no books for it
            return
        self.bytes -= job.reserved
        job.reserved = 0
        held = job.content_key
        if held is not None and held in self._shared:  # its reference was taken at add
            job.data = self._shared[held][0]
            return
        if content_key is not None and content_key in self._shared:
            data, size, refs = self._shared[content_key]
            self._shared[content_key] = (data, size, refs + 1)
        else:
            content_key = content_key or f"job:{job.id}"
            size = result_bytes(data)
            self._shared[content_key] = (data, size, 1)
            self.bytes += size
        job.data, job.content_key = data, content_key

    def release(self, job: Job) -> None:
        """The job ended without images: its reservation is free again."""
        if job.id in self.jobs:
            self.bytes -= job.reserved
        job.reserved = 0

    # -- lookup -------------------------------------------------------------------------
    def get(self, job_id: str, owner: str | None) -> Job:
        """The job, for its owner only: others get the same 404 as for an unknown id."""
        self.purge()
        job = self.jobs.get(job_id)
        if job is None or job.owner != owner:
            raise APIError(404, f"no job {job_id[:64]!r} (unknown, or its result expired)",
                           "id", "job_not_found")
        return job

    def unfetched(self, since: float = 0.0) -> int:
        """Jobs whose outcome nobody has read yet: still running or encoding, or ended
        after `since` (a drain does not wait for results abandoned before it began).
        Safe from another thread: it iterates a snapshot."""
        return sum(1 for j in list(self.jobs.values())
                   if j.status != "cancelled" and not j.fetched
                   and (j.ended_at is None or j.ended_at >= since))

    def mine(self, owner: str | None, quota: str) -> list[Job]:
        """The caller's jobs: by key, or without auth by client address."""
        self.purge()
        if owner is not None:
            return [j for j in self.jobs.values() if j.owner == owner]
        return [j for j in self.jobs.values() if j.owner is None and j.quota == quota]

    # -- forgetting ---------------------------------------------------------------------
    def purge(self) -> None:
        now = time.time()
        for job in [j for j in self.jobs.values()
                    if j.ended_at is not None and now - j.ended_at > self.ttl_s]:
            self._drop(job)

    def _evict(self, need: int) -> None:
        """Ended jobs nobody is waiting for any more, oldest first: fetched results, and
        jobs that ended without images."""
        done = sorted((j for j in self.jobs.values() if j.final
                       and (j.fetched or j.status != "completed")),
                      key=lambda j: j.ended_at or 0.0)
        for job in done:
            if len(self.jobs) < self.max_jobs and self.bytes + need <= self.max_bytes:
                return
            self._drop(job)

    def _drop(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        self.bytes -= JOB_OVERHEAD + job.reserved
        job.reserved = 0
        key = job.content_key
        if key is not None and key in self._shared:
            data, size, refs = self._shared[key]
            if refs <= 1:
                del self._shared[key]
                self.bytes -= size
            else:
                self._shared[key] = (data, size, refs - 1)
