"""The JobBackend contract: the in-process loop, the device group and the Redis client
answer the same calls; draining awaits the asyncio side instead of blocking it."""

import asyncio
import time

import pytest

from fakes import FakeEngine
from stepserve.server.scheduler.backend import Handle, JobBackend, Progress
from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore
from stepserve.server.scheduler.events import Completed
from stepserve.server.scheduler.loop import EngineLoop
from stepserve.server.scheduler.loop_group import LoopGroup
from stepserve.server.scheduler.request import GenerationParams


def backend_members() -> set[str]:
    return {n for n in vars(JobBackend) if not n.startswith("_")}


def engine_loop() -> EngineLoop:
    return EngineLoop(SchedulerCore(FakeEngine(), SchedulerConfig(max_batch_size=4)))


def test_every_backend_implements_the_whole_protocol():
    redis_client = pytest.importorskip("stepserve.server.redis.client")
    backends = [EngineLoop, LoopGroup, redis_client.RedisLoop]
    for cls in backends:
        missing = sorted(n for n in backend_members() if not hasattr(cls, n))
        assert not missing, f"{cls.__name__} lacks {missing}"
        assert asyncio.iscoroutinefunction(cls.drain), cls.__name__
    assert {"submit", "cancel", "progress", "drain", "shared"} <= backend_members()


def test_drain_awaits_work_that_needs_the_event_loop():
    """A Redis-backed request ends only when its asyncio task runs: drain must await, not
    sleep, or it holds the loop for its whole timeout (the API role's old shutdown)."""
    redis_client = pytest.importorskip("stepserve.server.redis.client")
    loop = redis_client.RedisLoop("redis://127.0.0.1:1", "m", 8)  # never connects here

    async def go() -> float:
        handle = Handle("img-x", GenerationParams("p", 2, 1, 1.0), backend=loop)
        loop.handles[handle.id] = handle

        async def finish_later() -> None:  # what the job's task does when its result comes
            await asyncio.sleep(0.2)
            loop.handles.pop(handle.id)

        task = asyncio.create_task(finish_later())
        start = time.monotonic()
        assert await loop.drain(timeout=30)
        await task
        return time.monotonic() - start

    assert asyncio.run(go()) < 5


def test_engine_loop_drain_finishes_in_flight_work_then_stops():
    loop = engine_loop()
    loop.start()

    async def go():
        handle = loop.submit(GenerationParams("p", 6, 1, 1.0))
        drained = await loop.drain(timeout=30)
        event = handle.events.get_nowait()
        return drained, event

    drained, event = asyncio.run(go())
    assert drained and isinstance(event, Completed)
    assert not loop._thread.is_alive()


def test_progress_is_typed_and_ends_queued_for_unknown_ids():
    loop = engine_loop()
    group = LoopGroup([loop, engine_loop()])
    assert loop.progress("nope") == Progress("queued", 0, 0)  # behind all 0 waiting
    assert group.progress("nope") == Progress("queued")


def test_request_ids_carry_128_random_bits():
    import re

    loop = engine_loop()

    async def go():
        return [loop.submit(GenerationParams("p", 2, i, 1.0)).id for i in range(3)]

    ids = asyncio.run(go())
    assert all(re.fullmatch(r"img-[0-9a-f]{32}", i) for i in ids), ids
    assert len(set(ids)) == 3 and len({i[4:12] for i in ids}) == 3  # no shared counter prefix
