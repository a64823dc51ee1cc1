"""`stepserve serve`: the all-in-one server (HTTP API + scheduler + engine).

Its flags are derived from the Settings fields (commands/common.py), so flags,
config-file keys and STEPSERVE_* variables cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_settings_flags, settings_from_args

HELP = "run the HTTP server on the built-in model (or a configured one)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_settings_flags(p)


def run(args: argparse.Namespace, role: str = "serve") -> int:
    import uvicorn
    from pydantic import ValidationError

    from stepserve.server.app import create_app

    try:
        settings = settings_from_args(args)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    runtime = None
    if role == "api":
        from stepserve.server.redis.api_runtime import ApiRuntime

        if not settings.redis_url:
            print("error: stepserve api needs --redis-url", file=sys.stderr)
            return 2
        runtime = ApiRuntime(settings)
    config = uvicorn.Config(create_app(settings, runtime=runtime), host=settings.host,
                            port=settings.port, log_level=settings.log_level,
                            timeout_keep_alive=int(settings.keep_alive_s),
                            timeout_graceful_shutdown=int(settings.drain_timeout_s))
    uvicorn.Server(config).run()
    return 0
