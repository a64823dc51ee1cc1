"""Engine registry with lazy imports: optional backends cost nothing until chosen."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .base import Engine

# name -> "module:factory"; the module is imported only when the engine is built.
_ENGINES: dict[str, str] = {
    "torch": "stepserve.engines.torch_engine:TorchEngine",
    "onnxruntime": "stepserve.engines.ort_engine:OnnxRuntimeEngine",
    "tensorrt": "stepserve.engines.tensorrt_engine:TensorRTEngine",
}


def register(name: str, target: str) -> None:
    _ENGINES[name] = target


def available() -> list[str]:
    return sorted(_ENGINES)


def engine_factory(name: str) -> Callable[..., Engine]:
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(available())}")
    module, _, attr = _ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def create_engine(name: str, **kwargs: Any) -> Engine:
    return engine_factory(name)(**kwargs)
