"""The app in-process with the official openai client (no subprocess, no port)."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import openai
from PIL import Image

from stepserve.server.app import create_app
from stepserve.server.settings import Settings


def make_app(engine, **settings):
    """The server on `engine`, loaded in the calling thread."""
    app = create_app(Settings(warmup_batch_sizes=[1], **settings), builder=lambda s: engine)
    app.state.runtime.start(background=False)
    return app


def run(app, fn):
    """await fn(openai client, httpx client) against the app; then shut it down."""
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as h:
            client = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="unused",
                                        http_client=h)
            return await fn(client, h)

    try:
        return asyncio.run(go())
    finally:
        app.state.runtime.shutdown()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


async def wait_job(h: httpx.AsyncClient, job_id: str, tries: int = 200) -> dict:
    """GET /v1/jobs/{id} until it has ended (or `tries` polls): its last view."""
    for _ in range(tries):
        view = (await h.get(f"/v1/jobs/{job_id}")).json()
        if view["status"] in ("completed", "failed", "cancelled"):
            break
        await asyncio.sleep(0.05)
    return view
