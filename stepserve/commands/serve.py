"""`stepserve serve`: the all-in-one server (HTTP API + scheduler + engine).

Its flags are derived from the Settings fields (commands/common.py), so flags,
config-file keys and STEPSERVE_* variables cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

from .common import CommandError, add_settings_flags, check_models, load_settings
from .common import settings_from_args as settings_from_args  # tests/test_settings.py

HELP = "run the HTTP server on the built-in model (or a configured one)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_settings_flags(p)


def stop_on_load_error(runtime: Any, server: Any, failed: list[str]) -> None:
    """Until the models are ready: if loading fails (it runs in the background so /health
    answers meanwhile), record why and ask uvicorn to stop; `run` then exits with status 1."""
    while not runtime.ready and not server.should_exit:
        if runtime.error:
            failed.append(runtime.error)
            server.should_exit = True
            return
        time.sleep(0.1)


def run(args: argparse.Namespace, role: str = "serve") -> int:
    settings = load_settings(args)
    if role == "api":
        from stepserve.server.redis.api_runtime import ApiRuntime

        if not settings.redis_url:
            raise CommandError("stepserve api needs --redis-url")
        runtime: Any = ApiRuntime(settings)
    else:
        check_models(settings, several_devices=True)  # a bad --model fails here, not later
        from stepserve.server.runtime import Runtime

        runtime = Runtime(settings)
    import uvicorn

    from stepserve.server.app import create_app
    from stepserve.server.connections import guarded_protocol

    config = uvicorn.Config(create_app(settings, runtime=runtime), host=settings.host,
                            port=settings.port, log_level=settings.log_level,
                            timeout_keep_alive=int(settings.keep_alive_s),
                            timeout_graceful_shutdown=int(settings.drain_timeout_s),
                            proxy_headers=True,
                            forwarded_allow_ips=settings.forwarded_allow_ips,
                            http=guarded_protocol(settings.header_timeout_s,
                                                  settings.body_timeout_s,
                                                  settings.max_connections))
    from stepserve.server.drain import DrainingServer, keep_streams_open_on_shutdown

    keep_streams_open_on_shutdown()
    server = DrainingServer(config, runtime, settings.drain_timeout_s)
    reload_loras_on_sighup(runtime)
    failed: list[str] = []
    threading.Thread(target=stop_on_load_error, args=(runtime, server, failed),
                     name="stepserve-load-watch", daemon=True).start()
    server.run()
    if failed:
        print(f"error: model failed to load: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def reload_loras_on_sighup(runtime) -> None:
    """SIGHUP rescans the lora_dirs folders (as POST /v1/loras/reload does)."""
    import signal

    from stepserve.server.loras import reload_all

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set there (e.g. serve run from a test thread)
    if hasattr(signal, "SIGHUP"):  # probed: Windows has no SIGHUP
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(
            target=reload_all, args=(runtime,), name="stepserve-lora-reload",
            daemon=True).start())
