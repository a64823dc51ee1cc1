"""`stepserve serve`: the all-in-one server (HTTP API + scheduler + engine).

Its flags are derived from the Settings fields, so flags, config-file keys and
STEPSERVE_* variables cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing

HELP = "run the HTTP server on the built-in model (or a configured one)"


def _flag_kwargs(annotation: object) -> dict:
    """argparse options for a settings field's type (Optional[X] is treated as X)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if origin is list:
        return {"nargs": "+", "type": typing.get_args(annotation)[0]}
    if annotation in (int, float):
        return {"type": annotation}
    return {}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from stepserve.server.settings import Settings

    p.add_argument("--config", help="TOML or JSON settings file (keys as the flags, with _)")
    for name, field in Settings.model_fields.items():
        if name == "models":  # a list of tables: config file (or env JSON) only
            continue
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                       help=f"{field.description} (default: {field.default})",
                       **_flag_kwargs(field.annotation))


def settings_from_args(args: argparse.Namespace):
    from stepserve.server.settings import Settings

    flags = {name: getattr(args, name) for name in Settings.model_fields if name != "models"}
    return Settings.load(args.config, **flags)


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
