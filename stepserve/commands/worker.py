"""`stepserve worker`: scheduler + engines, taking jobs from Redis (one per GPU or node)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .common import CommandError, add_settings_flags, check_models, load_settings

HELP = "scheduler + engines of the scaled-out roles, fed by Redis (needs --redis-url)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_settings_flags(p)
    p.add_argument("--metrics-port", type=int, default=9100,
                   help="Prometheus /metrics of this worker (0: off); up once models are warm")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if not settings.redis_url:
        raise CommandError("stepserve worker needs --redis-url")
    check_models(settings, several_devices=True)  # a bad --model fails here, not later
    from stepserve.server.redis.worker import RedisWorker
    from stepserve.server.runtime import Runtime

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    runtime = Runtime(settings)
    runtime.start(background=False)
    if runtime.error:
        print(f"error: model failed to load: {runtime.error}", file=sys.stderr)
        return 1
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=settings.host,
                          registry=runtime.metrics.registry)
    worker = RedisWorker(settings.redis_url, runtime.models, settings.visibility_timeout_s,
                         settings.url_ttl_s)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP: rescan lora_dirs and announce the adapters again (API replicas reread
        # them on POST /v1/loras/reload)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(worker.reload_loras()))
        await worker.run(stop, settings.drain_timeout_s)

    asyncio.run(main())
    runtime.shutdown()
    return 0
