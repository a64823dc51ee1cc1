"""Engine registry with lazy imports: optional backends cost nothing until chosen."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Engine

# Numeric precisions some engine supports; each engine checks its own subset.
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "fp8")

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


def engine_factory(name: str) -> Callable[..., Engine]:  # noqa: UP037
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(available())}")
    module, _, attr = _ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)  # the registered name


def create_engine(name: str, **kwargs: Any) -> Engine:
    return engine_factory(name)(**kwargs)
