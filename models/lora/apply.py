"""Each row's LoRA update inside ONE batched forward, the base weights untouched.

Why not PEFT / diffusers' `set_adapters`: they hold one active adapter set for the
whole module, so rows with different adapters or scales would need separate
forwards (what the peers do: split the batch by adapter). Here, as in the
multi-adapter LLM servers (Punica, S-LoRA), the base layer runs once over the
whole batch and a forward hook adds each (row, adapter) pair's low-rank update:
the pairs are grouped by adapter, each group's rows go through its two small
matmuls (segmented, as Punica's SGMV), and the results are added to their rows in
place. A batch whose rows all carry one adapter skips the gather.

Which rows carry which adapters is set per forward with `rows(...)` (a context
variable, so the hooks need no extra forward arguments and every model kind
works); a forward that runs only some rows through a part of the model (block
caches, DeepCache) narrows it with `subset(...)`.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .format import LoraModule, LoraWeights

Adapters = tuple[tuple[LoraWeights, float], ...]  # one row's adapters with their scales


@dataclass
class _Plan:
    """The rows of the forward now running, as positions into `rows`."""

    rows: list[Adapters | None]
    index: list[int] | None = None  # the subset now running (None: all rows)
    prepared: dict[tuple, Any] = field(default_factory=dict)  # per (module, subset)

    def current(self) -> list[Adapters | None]:
        return self.rows if self.index is None else [self.rows[i] for i in self.index]


_ACTIVE: ContextVar[_Plan | None] = ContextVar("stepserve_lora_rows", default=None)


@contextmanager
def rows(selection: Sequence[Adapters | None]) -> Iterator[None]:
    """Within this block, the model's i-th batch row carries selection[i]'s adapters
    (a no-op when no row has one)."""
    plan = _Plan(list(selection)) if any(selection) else None
    token = _ACTIVE.set(plan)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextmanager
def subset(index: Sequence[int]) -> Iterator[None]:
    """Within this block, the batch is the current batch's rows `index` (in order)."""
    plan = _ACTIVE.get()
    if plan is None:
        yield
        return
    outer = plan.index
    plan.index = [outer[i] for i in index] if outer is not None else list(index)
    try:
        yield
    finally:
        plan.index = outer


@dataclass
class _Pairs:
    """One module's (row, adapter) pairs in one forward, ordered by adapter so that each
    adapter's rows are one contiguous segment (segmented matmuls, as Punica's SGMV)."""

    rows: torch.Tensor  # (P,) batch row of each pair, grouped by adapter
    scales: torch.Tensor  # (P,)
    segments: tuple[tuple[LoraModule, int, int], ...]  # adapter, first pair, end
    whole: float | None  # every row has exactly this one adapter at this scale


class LoraHooks:
    """The forward hooks on one denoiser: one per adapted Linear / Conv2d, installed
    once per module path (any adapter for that module reuses it)."""

    def __init__(self, model: nn.Module, cache: int = 1024) -> None:
        self._model = weakref.ref(model)
        self._paths: set[str] = set()
        self._moved: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache = cache
        self.handles: list[Any] = []

    def attach(self, adapter: LoraWeights) -> None:
        model = self._model()
        assert model is not None
        found = dict(model.named_modules())
        for path in adapter.modules:
            if path not in self._paths:
                self.handles.append(found[path].register_forward_hook(self._hook(path)))
                self._paths.add(path)

    def _hook(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            plan = _ACTIVE.get()
            if plan is None:
                return None
            pairs = self._pairs(plan, path, output.shape[0])
            if pairs is None:
                return None
            return self._add(module, args[0], output, pairs)
        return hook

    def _pairs(self, plan: _Plan, path: str, batch: int) -> _Pairs | None:
        key = (path, None if plan.index is None else tuple(plan.index))
        if key in plan.prepared:
            return plan.prepared[key]
        current = plan.current()
        if len(current) != batch:
            raise RuntimeError(f"LoRA rows ({len(current)}) do not match the batch at "
                               f"{path} ({batch}): a forward that runs a subset of rows "
                               "must say so with lora.apply.subset")
        by_adapter: dict[int, tuple[LoraModule, list[tuple[int, float]]]] = {}
        for i, sel in enumerate(current):
            for adapter, scale in sel or ():
                m = adapter.modules.get(path)
                if m is not None and scale != 0.0:
                    by_adapter.setdefault(id(m), (m, []))[1].append((i, scale))
        pairs = None
        if by_adapter:
            rows_, scales, segments = [], [], []
            for m, members in by_adapter.values():
                segments.append((m, len(rows_), len(rows_) + len(members)))
                rows_ += [i for i, _ in members]
                scales += [s for _, s in members]
            whole = (scales[0] if len(segments) == 1 and rows_ == list(range(batch))
                     and len(set(scales)) == 1 else None)
            pairs = _Pairs(torch.tensor(rows_), torch.tensor(scales), tuple(segments), whole)
        plan.prepared[key] = pairs
        return pairs

    def _weights(self, m: LoraModule, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair on the model's device (CPU copies are the loaded adapter itself)."""
        if m.down.device == device or m.down.requires_grad:
            return m.down, m.up
        key = (id(m), device)
        if key not in self._moved:
            self._moved[key] = (m.down.to(device), m.up.to(device))
            while len(self._moved) > self._cache:
                self._moved.popitem(last=False)
        self._moved.move_to_end(key)
        return self._moved[key]

    def _add(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor,
             pairs: _Pairs) -> torch.Tensor:
        """output + each pair's scale * B(A x) on its row (in place: the output is the
        layer's own fresh tensor)."""
        conv = isinstance(module, nn.Conv2d)

        def middle(m: LoraModule, xs: torch.Tensor, scale: torch.Tensor | float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            """(scale * A xs, B): the scale applied to the small rank-r middle."""
            down, up = self._weights(m, xs.device)
            if conv:
                assert isinstance(module, nn.Conv2d)
                return module._conv_forward(xs, down.to(xs.dtype), None) * scale, up
            return F.linear(xs, down.to(xs.dtype)) * scale, up

        def project(h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            return F.conv2d(h, up.to(h.dtype)) if conv else F.linear(h, up.to(h.dtype))

        if pairs.whole is not None:  # one adapter on every row: no gather at all
            h, up = middle(pairs.segments[0][0], x, pairs.whole)
            if conv:
                return output.add_(project(h, up).to(output.dtype))
            flat = output.view(-1, output.shape[-1])  # a Linear's own (contiguous) output
            flat.addmm_(h.reshape(-1, h.shape[-1]).to(output.dtype), up.to(output.dtype).T)
            return output
        rows_ = pairs.rows.to(x.device)
        shape = (-1,) + (1,) * (x.dim() - 1)
        for m, lo, hi in pairs.segments:
            idx = rows_[lo:hi]
            scale = pairs.scales[lo:hi].to(x.device, x.dtype).view(shape)
            h, up = middle(m, x.index_select(0, idx), scale)
            output.index_add_(0, idx, project(h, up).to(output.dtype))
        return output

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._paths.clear()
        self._moved.clear()


_HOOKS: weakref.WeakKeyDictionary[nn.Module, LoraHooks] = weakref.WeakKeyDictionary()


def attach(model: nn.Module, adapter: LoraWeights) -> LoraHooks:
    """Make `adapter` applicable to `model`'s rows (idempotent; nothing is merged)."""
    hooks = _HOOKS.get(model)
    if hooks is None:
        hooks = _HOOKS[model] = LoraHooks(model)
    hooks.attach(adapter)
    return hooks


def detach(model: nn.Module) -> None:
    hooks = _HOOKS.pop(model, None)
    if hooks is not None:
        hooks.detach()
