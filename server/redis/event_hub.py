"""One Redis pub/sub connection per API process for the events of all its jobs.

A connection per waiting job would not scale (redis-py's pool stops at 100 and Redis
pays for each); instead channels are subscribed and unsubscribed on one connection
and a reader task hands each message to its job's queue. When the connection drops
(Redis restart), messages may be lost: every queue gets `LOST` when the connection
drops and again once it is back, and its reader then checks the job's stored state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from .connect import UNAVAILABLE

log = logging.getLogger("stepserve.api")
LOST = None  # put on every queue after a reconnect: some messages may be missing


class EventHub:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.queues: dict[str, asyncio.Queue] = {}
        self.pubsub = None
        self.reader: asyncio.Task | None = None
        self._connecting = asyncio.Lock()
        self._dropped = False

    async def open(self, channel: str) -> asyncio.Queue:
        """Subscribe before the job is queued, so its end cannot be missed."""
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[channel] = queue
        try:
            if self.pubsub is None:
                await self._connect()
            else:
                await self.pubsub.subscribe(channel)
        except BaseException:
            self.queues.pop(channel, None)
            raise
        return queue

    async def close(self, channel: str) -> None:
        self.queues.pop(channel, None)
        if self.pubsub is not None:
            with contextlib.suppress(*UNAVAILABLE):
                await self.pubsub.unsubscribe(channel)

    async def _connect(self) -> None:
        async with self._connecting:
            if self.pubsub is not None:
                return
            pubsub = self.client.pubsub()
            await pubsub.subscribe(*self.queues)
            self.pubsub = pubsub
            if self._dropped:  # what was announced while we were away is stored: look
                self._dropped = False
                for queue in list(self.queues.values()):
                    queue.put_nowait(LOST)
            if self.reader is None or self.reader.done():
                self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                if self.pubsub is None:
                    await self._connect()
                msg = await self.pubsub.get_message(ignore_subscribe_messages=True,
                                                    timeout=1.0)
                if msg is not None:
                    queue = self.queues.get(msg["channel"].decode())
                    if queue is not None:
                        queue.put_nowait(msg["data"])
            except UNAVAILABLE as exc:
                log.warning("event channel lost (%s); reconnecting", exc)
                old, self.pubsub = self.pubsub, None
                self._dropped = True
                if old is not None:
                    with contextlib.suppress(Exception):
                        await old.aclose()
                for queue in list(self.queues.values()):
                    queue.put_nowait(LOST)
                await asyncio.sleep(0.5)
