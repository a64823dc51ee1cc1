"""Command-line flags derived from the one Settings object (see docs/cli.md).

Every command that runs a model takes its model flags from `Settings` fields: the
same names, choices (from the engine and cache registries), defaults and help as
the config-file keys and STEPSERVE_* variables, resolved by `Settings.load`
(defaults < config file < environment < flags).
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from typing import Any

# The Settings fields `generate`, `eval` and `build` take (serve, api, worker: all).
MODEL_FLAGS = ("model", "image_size", "engine", "precision", "quantization", "device",
               "batching", "max_batch_size", "max_steps", "cache", "compile", "ort_providers",
               "ort_opt_level", "build_dir", "threads", "text_cache_size")


def _flag_kwargs(name: str, annotation: object) -> dict:
    """argparse options for a settings field's type (Optional[X] is treated as X)."""
    from stepserve.server.settings import CHOICES

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    if name in CHOICES:
        return {"choices": list(CHOICES[name]())}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if origin is list:
        return {"nargs": "+", "type": typing.get_args(annotation)[0]}
    if annotation in (int, float):
        return {"type": annotation}
    return {}


def _help(field: Any) -> str:
    text = field.description or ""
    if "(default" in text:  # the description says it (e.g. "default: the model's")
        return text
    default = field.default_factory() if field.default_factory else field.default
    if default is None:
        default = "none"
    elif isinstance(default, list):
        default = " ".join(map(str, default)) or "none"
    elif isinstance(default, bool):
        default = "on" if default else "off"
    return f"{text} (default: {default})"


def add_settings_flags(p: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """`--config` plus a flag per Settings field (all but the `models` list, a config-file
    table, when `names` is None). A flag left out keeps the lower-precedence value."""
    from stepserve.server.settings import Settings

    wanted = set(names) if names is not None else None
    p.add_argument("--config", help="TOML or JSON settings file (keys as the flags, with _)")
    for name, field in Settings.model_fields.items():
        if name == "models" or (wanted is not None and name not in wanted):
            continue
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                       help=_help(field), **_flag_kwargs(name, field.annotation))


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The model flags of the commands that run a model without a server."""
    add_settings_flags(p, MODEL_FLAGS)


def settings_from_args(args: argparse.Namespace) -> Any:
    """Settings from the config file, the environment and the flags given."""
    from stepserve.server.settings import Settings

    flags = {name: getattr(args, name) for name in Settings.model_fields
             if name != "models" and hasattr(args, name)}
    return Settings.load(args.config, **flags)


def engine_from_settings(settings: Any, **extra: Any) -> Any:
    """The engine the settings name, built the same way `serve` builds it."""
    from stepserve.server.runtime import build_engine

    return build_engine(settings, **extra)


class CommandError(Exception):
    """A user error: `stepserve` prints `error: <message>` and exits with status 2."""


def load_model(args: argparse.Namespace, **extra: Any) -> tuple[Any, Any]:
    """(settings, engine) for an offline command, or CommandError naming the problem."""
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        raise CommandError(f"invalid settings: {exc}") from exc
    try:
        engine = engine_from_settings(settings, **extra)
    except (ValueError, RuntimeError) as exc:
        raise CommandError(str(exc)) from exc
    return settings, engine


def cache_for(settings: Any, engine: Any) -> Any:
    """The settings' cache policy as a config, checked against the engine's model."""
    from stepserve.models.caches.config import CacheConfig

    cache = CacheConfig.parse(settings.cache)
    problem = engine.capabilities.cache_error(cache, engine.info.model, engine.info.engine)
    if problem:
        raise CommandError(f"--cache {settings.cache}: {problem}")
    return cache if cache.enabled else None


def check_sampler(engine: Any, sampler: str | None) -> str:
    caps = engine.capabilities
    if sampler is not None and sampler not in caps.samplers:
        raise CommandError(f"--sampler {sampler}: not available for {engine.info.model!r}; "
                           f"one of {', '.join(caps.samplers)}")
    return sampler or caps.default_sampler
