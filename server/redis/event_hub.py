"""One Redis pub/sub connection per API process (per served model) for the events of
all its jobs.

A connection per waiting job would not scale (redis-py's pool stops at 100 and Redis
pays for each). Two long-lived tasks own the connection: a writer that brings the
subscriptions in line with the jobs waiting (`open` / `close` only register and wake
it), and a reader that hands each message to its job's queue. Request tasks never
touch the connection, so a cancelled request cannot break it for the others. When
the connection drops (Redis restart), messages may be lost: every queue gets `LOST`
when it drops and again once the subscriptions are back, and its reader then checks
the job's stored state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger("stepserve.api")
LOST = None  # put on a queue when messages may have been missed
SUBSCRIBE_TIMEOUT_S = 5.0


class EventHub:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.queues: dict[str, asyncio.Queue] = {}
        self.pubsub = None
        self._subscribed: set[str] = set()
        self._waiters: dict[str, asyncio.Future] = {}
        self._changed = asyncio.Event()
        self._dropped = False
        self._tasks: list[asyncio.Task] = []

    async def open(self, channel: str) -> asyncio.Queue:
        """Subscribe before the job is queued, so its end cannot be missed; raises a
        Redis ConnectionError when the subscription cannot be made."""
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[channel] = queue
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[channel] = waiter
        self._start()
        self._changed.set()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), SUBSCRIBE_TIMEOUT_S)
        except BaseException as exc:
            self.close(channel)
            if isinstance(exc, asyncio.TimeoutError):
                raise RedisConnectionError("timed out subscribing to job events") from None
            raise
        return queue

    def close(self, channel: str) -> None:
        self.queues.pop(channel, None)
        self._waiters.pop(channel, None)
        self._changed.set()  # the writer unsubscribes

    def _start(self) -> None:
        if not self._tasks or any(t.done() for t in self._tasks):
            for t in self._tasks:
                t.cancel()
            self._tasks = [asyncio.create_task(self._write()),
                           asyncio.create_task(self._read())]

    async def _write(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                if self.pubsub is None:
                    self.pubsub = self.client.pubsub()
                want = set(self.queues)
                add, drop = want - self._subscribed, self._subscribed - want
                if add:
                    await self.pubsub.subscribe(*add)
                    self._subscribed |= add
                if drop:
                    await self.pubsub.unsubscribe(*drop)
                    self._subscribed -= drop
                for channel in add:
                    waiter = self._waiters.pop(channel, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                if self._dropped and add:  # back after a drop: look at stored states
                    self._dropped = False
                    for queue in list(self.queues.values()):
                        queue.put_nowait(LOST)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stale = not self._dropped  # a connection that died while idle: retry now
                self._drop(exc)
                await asyncio.sleep(0.05 if stale else 0.5)
                self._changed.set()  # try again: every wanted channel anew

    async def _read(self) -> None:
        while True:
            pubsub = self.pubsub
            if pubsub is None or not self._subscribed:
                await asyncio.sleep(0.05)
                continue
            try:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if pubsub is self.pubsub:
                    self._drop(exc)
                    self._changed.set()
                await asyncio.sleep(0.5)
                continue
            if msg is not None and msg.get("type") == "message":
                queue = self.queues.get(msg["channel"].decode())
                if queue is not None:
                    queue.put_nowait(msg["data"])

    def _drop(self, exc: Exception) -> None:
        """The connection is gone: start afresh (new subscribers keep waiting, up to
        SUBSCRIBE_TIMEOUT_S; jobs already queued re-check their stored state)."""
        log.warning("job event channel lost (%s); reconnecting", exc)
        old, self.pubsub = self.pubsub, None
        self._subscribed = set()
        self._dropped = True
        if old is not None:
            asyncio.create_task(_close(old))
        for queue in list(self.queues.values()):
            queue.put_nowait(LOST)


async def _close(pubsub) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()
