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
from collections.abc import Iterable, Sequence
from pathlib import Path
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


def _validation_message(exc: Exception) -> str:
    """One line for a settings error (pydantic's own message spans several lines)."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        got = repr(err["input"])
        got = "" if err["type"] == "missing" else f" (got {got[:60]})"
        parts.append(f"{where}: {err['msg']}{got}")
    return "; ".join(parts)


def load_settings(args: argparse.Namespace) -> Any:
    """`settings_from_args`, with a bad value or a missing config file as a CommandError."""
    from pydantic import ValidationError

    try:
        return settings_from_args(args)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        raise CommandError(f"invalid settings: {_validation_message(exc)}") from exc


# engine or model kind -> (module it needs, how to get it)
_NEEDS = {"onnxruntime": ("onnxruntime", "the onnxruntime engine needs `pip install "
                          "'stepserve[onnx]'` (onnxruntime-gpu for CUDA)"),
          "tensorrt": ("tensorrt", "the tensorrt engine needs NVIDIA TensorRT (`pip install "
                       "tensorrt` on a CUDA machine)"),
          "diffusers": ("diffusers", "diffusers folders need `pip install 'stepserve[families]'`")}


def _missing(kind: str) -> str | None:
    import importlib.util

    module, how = _NEEDS[kind]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else how


def _device_problem(device: str, several: bool) -> str | None:
    import torch

    devices = [d.strip() for d in device.split(",") if d.strip()]
    if not devices:
        return f"--device {device!r}: use cpu, cuda or cuda:N"
    if len(devices) > 1 and not several:
        return (f"--device {device}: this command runs on one device (several, comma-"
                "separated, are for serve and worker)")
    for name in devices:
        try:
            dev = torch.device(name)
        except RuntimeError:
            return f"--device {name}: not a device; use cpu, cuda or cuda:N"
        if dev.type != "cuda":
            continue
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible")
            return (f"--device {name}: {why} (torch {torch.__version__}); use --device cpu, "
                    "or install a CUDA build of torch on a machine with a GPU")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return f"--device {name}: this machine has {count} CUDA device(s), cuda:0..{count - 1}"
    return None


def check_models(settings: Any, several_devices: bool = False) -> None:
    """CommandError for what would stop a configured model from loading, found before any
    loading starts: each model (`--model` or a config file's `[[models]]`) is 'builtin' or a
    diffusers folder, its device exists, its engine's optional packages are installed."""
    try:
        entries = settings.per_model()
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    for s in entries:
        if s.model != "builtin" and not (Path(s.model) / "model_index.json").is_file():
            where = "[[models]] path" if settings.models else "--model"
            raise CommandError(f"{where} {s.model}: not 'builtin' and not a diffusers folder "
                               "(no model_index.json)")
        kind = s.engine if s.model == "builtin" else "diffusers"
        problem = ((_missing(kind) if kind in _NEEDS else None)
                   or _device_problem(s.device, several_devices))
        if problem:
            raise CommandError(f"model {s.model_name!r}: {problem}" if settings.models
                               else problem)


def load_model(args: argparse.Namespace, settings: Any = None,
               **extra: Any) -> tuple[Any, Any]:
    """(settings, engine) for an offline command, or CommandError naming the problem."""
    settings = settings or load_settings(args)
    check_models(settings)
    try:
        engine = engine_from_settings(settings, **extra)
    except (ValueError, RuntimeError, ImportError, OSError) as exc:
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


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: on when stderr is a terminal)")


# percent, time spent and left, then the postfix (e.g. "4 steps, 64/200 images")
BAR = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"


def progress_bar(forced: bool | None, worth_showing: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on stderr: --progress shows it, --no-progress hides it; by default it
    shows for work worth it, and only when stderr is a terminal (tqdm's disable=None)."""
    import sys

    from tqdm import tqdm

    disable = (None if worth_showing else True) if forced is None else not forced
    return tqdm(file=sys.stderr, disable=disable, **kwargs)


class _Counted:
    """The engine, reporting as the scheduler uses it: `on_steps(n)` after each denoising
    step of n images, `on_images(n)` as n images finish. Everything else is the engine's
    own (the same object computes), so the images are the ones it gives without this."""

    def __init__(self, engine: Any, on_steps: Any, on_images: Any) -> None:
        self._engine, self._on_steps, self._on_images = engine, on_steps, on_images

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def step_batch(self, states: Any) -> Any:
        out = self._engine.step_batch(states)
        self._on_steps(len(states))
        return out

    def decode(self, x: Any) -> Any:
        images = self._engine.decode(x)
        self._on_images(len(images))
        return images


def generate_images(engine: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, *,
                    bar: Any, **kwargs: Any) -> Any:
    """`generate_offline` (one call, the same images) advancing `bar`, whose total counts
    image-steps, as the images are denoised, and showing how many images are done."""
    from stepserve.server.scheduler.offline import generate_offline

    end = bar.n + len(prompts) * steps  # a sampler taking extra steps stops at the end
    done = 0

    def stepped(n: int) -> None:
        bar.update(max(0, min(n, end - bar.n)))

    def finished(n: int) -> None:
        nonlocal done
        done += n
        bar.set_postfix_str(f"{steps} steps, {done}/{len(prompts)} images", refresh=False)

    images = generate_offline(_Counted(engine, stepped, finished), prompts, seeds, steps,
                              **kwargs)
    bar.update(end - bar.n)
    return images
