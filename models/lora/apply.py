"""Each row's LoRA update inside ONE batched forward, the base weights untouched.

Why not PEFT / diffusers' `set_adapters`: they hold one active adapter set for the
whole module, so rows with different adapters or scales would need separate
forwards (what the peers do: split the batch by adapter). Here, as in the
multi-adapter LLM servers (Punica, S-LoRA), the base layer runs once over the
whole batch and a forward hook adds each (row, adapter) pair's low-rank update:
the batch's distinct adapters are joined along the rank, each row carries its
scales on its adapters' columns (zeros elsewhere), and two small matmuls add every
row's update straight into the layer's output, whatever the mix (several adapters
per row included). Where only a few rows carry adapters, just those rows are
gathered, computed and scattered back.

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
    prepared: dict[tuple, Any] = field(default_factory=dict)  # per layer / adapter set
    distinct: list[LoraWeights] = field(init=False)  # every row's adapters, each once

    def __post_init__(self) -> None:
        seen: dict[int, LoraWeights] = {}
        for sel in self.rows:
            for adapter, _ in sel or ():
                seen.setdefault(id(adapter), adapter)
        # one order for a set of adapters, whatever the rows' order: the joined weights
        # of the set are then built once and reused (LoraHooks._joined_weights)
        self.distinct = sorted(seen.values(), key=lambda a: (a.name, a.digest, id(a)))

    def current(self) -> list[Adapters | None]:
        return self.rows if self.index is None else [self.rows[i] for i in self.index]


_ACTIVE: ContextVar[_Plan | None] = ContextVar("stepserve_lora_rows", default=None)


def adapters_key(adapters: Adapters | None) -> tuple:
    """Orders rows so that rows with the same adapters and scales lie side by side."""
    return tuple((a.name, a.digest, scale) for a, scale in adapters or ())


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
class _Rows:
    """One module's adapted rows in one forward: the batch's distinct adapters side by
    side (their ranks concatenated) and, per row, its scale on each adapter's columns
    (0 elsewhere). Any mix of adapters, scales and several adapters per row is then one
    gather, two matmuls and one scatter, however many adapters the batch holds."""

    rows: torch.Tensor  # (R,) adapted batch rows, or all of them (see `dense`)
    dense: bool  # computed for every row in `span` (plain rows' mask is 0): no gather
    span: slice  # the batch rows computed when dense
    mask: torch.Tensor  # (R, sum of ranks): each row's scales on its adapters' columns
    adapters: tuple[LoraModule, ...]
    uniform: float | None  # every row, one adapter, one scale: no mask needed


class LoraHooks:
    """The forward hooks on one denoiser: one per adapted Linear / Conv2d, installed
    once per module path (any adapter for that module reuses it)."""

    def __init__(self, model: nn.Module, cache_bytes: int = 64 << 20) -> None:
        self._model = weakref.ref(model)
        self._paths: set[str] = set()
        # (path, adapter ids, dtype, device) -> (down, up, the adapters: held so that
        # their ids are not reused while the entry lives)
        self._joined: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, tuple]] = (
            OrderedDict())
        self._cache_bytes = cache_bytes  # joined copies kept (each batch's mix may differ)
        self._held = 0
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
            rows_ = self._rows(plan, path, output.shape[0])
            if rows_ is None:
                return None
            return self._add(module, path, args[0], output, rows_)
        return hook

    def _rows(self, plan: _Plan, path: str, batch: int) -> _Rows | None:
        subset = None if plan.index is None else tuple(plan.index)
        if (path, subset) in plan.prepared:
            return plan.prepared[(path, subset)]
        current = plan.current()
        if len(current) != batch:
            raise RuntimeError(f"LoRA rows ({len(current)}) do not match the batch at "
                               f"{path} ({batch}): a forward that runs a subset of rows "
                               "must say so with lora.apply.subset")
        # the rows and masks depend only on which of the batch's adapters adapt this
        # layer: usually every layer alike, so they are built once per forward
        present = tuple(a for a in plan.distinct if path in a.modules)
        shared = (tuple(id(a) for a in present), subset)
        if shared not in plan.prepared:
            plan.prepared[shared] = _layout(current, present, batch)
        layout = plan.prepared[shared]
        found = None if layout is None else _Rows(
            layout[0], layout[1], layout[2], layout[3],
            tuple(a.modules[path] for a in present), layout[4])
        plan.prepared[(path, subset)] = found
        return found

    def _joined_weights(self, path: str, adapters: tuple[LoraModule, ...],
                        like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapters' downs stacked along the rank (sum r, in[, kh, kw]) and ups side
        by side (out, sum r[, 1, 1]), on the activations' device and dtype; kept for the
        next forward with the same adapters (not while training them)."""
        trainable = any(m.down.requires_grad or m.up.requires_grad for m in adapters)
        first = adapters[0]
        if len(adapters) == 1 and (trainable or (first.down.dtype == like.dtype
                                                 and first.down.device == like.device)):
            return first.down, first.up  # nothing to join or move
        key = (path, tuple(id(m) for m in adapters), like.dtype, like.device)
        if not trainable and key in self._joined:
            self._joined.move_to_end(key)
            down, up, _ = self._joined[key]
            return down, up
        down = torch.cat([m.down for m in adapters]).to(like.device, like.dtype)
        up = torch.cat([m.up for m in adapters], dim=1).to(like.device, like.dtype)
        if not trainable:
            self._joined[key] = (down, up, adapters)
            self._held += down.nbytes + up.nbytes
            while self._held > self._cache_bytes and len(self._joined) > 1:
                _, (d, u, _) = self._joined.popitem(last=False)
                self._held -= d.nbytes + u.nbytes
        return down, up

    def _add(self, module: nn.Module, path: str, x: torch.Tensor, output: torch.Tensor,
             r: _Rows) -> torch.Tensor:
        """output + each adapted row's sum of scale * B(A x), in place (the output is
        the layer's own fresh tensor)."""
        down, up = self._joined_weights(path, r.adapters, x)
        xs = x[r.span] if r.dense else x.index_select(0, r.rows.to(x.device))
        mask = r.mask.to(x.device, x.dtype)
        if isinstance(module, nn.Conv2d):
            h = module._conv_forward(xs, down, None).mul_(mask[:, :, None, None])
            delta = F.conv2d(h, up)
        else:
            h = F.linear(xs, down)
            if r.uniform is None:  # in place: h is fresh, and neither matmul's backward
                h.mul_(mask.view(mask.shape[0], *([1] * (x.dim() - 2)), -1))  # reads it
            if r.dense:  # fused into the output
                output[r.span].view(-1, output.shape[-1]).addmm_(
                    h.reshape(-1, h.shape[-1]).to(output.dtype), up.to(output.dtype).T,
                    alpha=1.0 if r.uniform is None else r.uniform)
                return output
            delta = F.linear(h, up)
        if r.dense:
            output[r.span].add_(delta.to(output.dtype))
            return output
        return output.index_add_(0, r.rows.to(x.device), delta.to(output.dtype))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._paths.clear()
        self._joined.clear()
        self._held = 0


def _layout(current: list[Adapters | None], present: tuple[LoraWeights, ...], batch: int
            ) -> tuple[torch.Tensor, bool, slice, torch.Tensor, float | None] | None:
    """(rows, dense, span, scale mask, uniform scale) for rows carrying `present`
    adapters, whose ranks lie side by side in that order."""
    if not present:
        return None
    starts = [0]
    for a in present:
        starts.append(starts[-1] + a.rank)
    slot = {id(a): k for k, a in enumerate(present)}
    picks: list[tuple[int, list[float]]] = []
    uses: set[tuple[tuple[int, float], ...]] = set()  # each row's (adapter, scale) pairs
    for i, sel in enumerate(current):
        row = [0.0] * starts[-1]
        mine = []
        for adapter, scale in sel or ():
            k = slot.get(id(adapter))
            if k is not None and scale != 0.0:
                for j in range(starts[k], starts[k + 1]):
                    row[j] += scale
                mine.append((k, scale))
        if mine:
            picks.append((i, row))
            uses.add(tuple(mine))
    if not picks:
        return None
    # adapted rows side by side (as guided_outputs orders them): compute that slice, no
    # gather or scatter; most rows adapted: every row (a plain row's scales are 0),
    # which saves the gather, the scatter and the delta's memory; only a few: just theirs
    first, last = picks[0][0], picks[-1][0] + 1
    span = slice(first, last) if last - first == len(picks) else slice(0, batch)
    dense = span.stop - span.start < batch or 2 * len(picks) >= batch
    zero = [0.0] * starts[-1]
    if dense:
        by_row = dict(picks)
        rows_ = list(range(span.start, span.stop))
        mask = [by_row.get(i, zero) for i in rows_]
    else:
        rows_, mask = [i for i, _ in picks], [row for _, row in picks]
    only = next(iter(uses))
    uniform = (only[0][1] if len(uses) == 1 and len(only) == 1 and len(present) == 1
               and len(rows_) == len(picks) else None)
    return torch.tensor(rows_), dense, span, torch.tensor(mask), uniform


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
