"""The PyTorch engine for the built-in model: fp32, bf16 autocast on CPU, fp16/bf16 on CUDA,
int8 weights through torchao."""

from __future__ import annotations

import contextlib
import copy
from typing import Any, TypeVar

import torch

from stepserve.models.builtin.text import TextBatch
from stepserve.models.caches.block_cache import RowCache, cached_forward
from stepserve.models.caches.lazydit import load_gates_for

from .builtin_base import BuiltinEngine

M = TypeVar("M", bound=torch.nn.Module)
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}


def int8_weights(module: M) -> M:
    """A copy whose Linear weights are int8 (per-channel scales; activations stay float)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise RuntimeError("int8 with the torch engine needs torchao: "
                           "pip install 'stepserve[int8]'") from exc
    module = copy.deepcopy(module)
    quantize_(module, Int8WeightOnlyConfig())
    return module


class TorchEngine(BuiltinEngine):
    name = "torch"
    runs_blocks = True  # denoise_cached runs the DiT's blocks itself (block caches)
    lora_fallback = False  # its own forward applies the adapters (compiled: see lora_rows)

    def __init__(self, precision: str = "fp32", device: str = "cpu", compile: bool = False,
                 **kwargs: Any) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"torch engine supports precision {sorted(_DTYPES)}, "
                             f"not {precision!r}")
        if precision == "fp16" and not device.startswith("cuda"):
            raise ValueError("fp16 needs a CUDA device; use bf16 on CPU")
        super().__init__(precision=precision, device=device, **kwargs)
        self.dtype = _DTYPES[precision]
        self.gates = load_gates_for(self.dit)  # LazyDiT gates trained for these weights
        if self.gates is not None:
            self.gates = self.gates.to(self.device)
        self.dit = self.dit.to(self.device)
        if precision == "int8":
            self.dit = int8_weights(self.dit)
        self.forward = torch.compile(self.dit) if compile else self.dit
        self.lora_fallback = compile  # the compiled graph does not run the LoRA hooks

    @torch.inference_mode()
    def lora_rows(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                  text: TextBatch) -> torch.Tensor:
        """Adapter rows of a compiled engine: the eager DiT, with the hooks."""
        self.lora_fallback_rows += x.shape[0]
        with self._autocast():
            return self.dit(x.to(self.device), t.to(self.device), d.to(self.device),
                            text.to(self.device)).float()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def denoise(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                text: TextBatch) -> torch.Tensor:
        with self._autocast():
            return self.forward(x.to(self.device), t.to(self.device), d.to(self.device),
                                text.to(self.device)).float()

    @torch.inference_mode()
    def denoise_cached(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                       text: TextBatch, rows: list[RowCache | None]
                       ) -> tuple[torch.Tensor, list[Any]]:
        """The forward with per-row block caches (runs the DiT's blocks itself)."""
        with self._autocast():
            v, states = cached_forward(self.dit, x.to(self.device), t.to(self.device),
                                       d.to(self.device), text.to(self.device), rows,
                                       self.gates)
        return v.float(), states
