"""Each row's LoRA update inside ONE batched forward, the base weights untouched.

Why not PEFT / diffusers' `set_adapters`: they hold one active adapter set for the
whole module, so rows with different adapters or scales would need separate
forwards (what the peers do: split the batch by adapter). Here, as in the
multi-adapter LLM servers (Punica, S-LoRA), the base layer runs once over the
whole batch and a forward hook adds each (row, adapter) pair's low-rank update:
the batch's distinct adapters are joined along the rank, each row carries its
scales on its adapters' columns (zeros elsewhere), and two small matmuls add every
row's update straight into the layer's output, whatever the mix (several adapters
per row included). The sampler puts rows with adapters side by side, those with the
same adapters together (sampling/batch.py), so the update runs on contiguous slices
of the batch: no gather, plain rows skipped, and with many distinct adapters the
slice is cut into parts that each join only their own rows' adapters (a segmented
GEMM in spirit, at the granularity where a part still pays for its extra matmuls).
Where a few scattered rows carry adapters, just those rows are gathered, computed
and scattered back.

Which rows carry which adapters is set per forward with `rows(...)` (a context
variable, so the hooks need no extra forward arguments and every model kind
works); a forward that runs only some rows through a part of the model (block
caches, DeepCache) narrows it with `subset(...)`.
"""

from __future__ import annotations

import math
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
            parts = self._rows(plan, path, output.shape[0])
            if parts is None:
                return None
            for part, adapters in parts:
                output = self._add(module, path, args[0], output, part, adapters)
            return output
        return hook

    def _rows(self, plan: _Plan, path: str, batch: int) -> list[Work] | None:
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
        found = None if layout is None else [
            (p, tuple(present[k].modules[path] for k in p.slots)) for p in layout]
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
             r: _Part, adapters: tuple[LoraModule, ...]) -> torch.Tensor:
        """output + each adapted row's sum of scale * B(A x), in place (the output is
        the layer's own fresh tensor)."""
        down, up = self._joined_weights(path, adapters, x)
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


@dataclass(frozen=True)
class _Part:
    """Rows of one forward that share one joined low-rank product: the part's adapters
    side by side (their ranks concatenated) and, per row, its scale on each adapter's
    columns (0 elsewhere). Any mix of adapters, scales and several adapters per row is
    then two matmuls on a slice (or a gather and a scatter around them)."""

    rows: torch.Tensor  # (R,) the part's rows: those in `span` when dense
    dense: bool  # computed for every row in `span` (plain rows' mask is 0): no gather
    span: slice  # the batch rows computed when dense
    mask: torch.Tensor  # (R, sum of ranks): each row's scales on its adapters' columns
    uniform: float | None  # every row, one adapter, one scale: no mask needed
    slots: tuple[int, ...]  # which of the batch's adapters (positions in `present`)


Work = tuple[_Part, tuple[LoraModule, ...]]  # a part and its adapters' modules at a layer


Picks = list[tuple[int, tuple[tuple[int, float], ...]]]  # (row, its (slot, scale) pairs)

# a part's fixed cost in (rows x rank) of low-rank arithmetic: two more small matmuls
# and a mask per layer (measured on the built-in model, 2 CPU threads: about 90 us a
# layer against about 1 us for one row at rank 1)
PART_COST = 96.0


def _layout(current: list[Adapters | None], present: tuple[LoraWeights, ...], batch: int
            ) -> list[_Part] | None:
    """The parts to compute for rows carrying `present` adapters. Adapted rows side by
    side (as guided_outputs orders them) are cut into contiguous parts wherever giving
    each part only its own rows' adapters saves more arithmetic than a part costs (a
    batch with many distinct adapters: the joined rank of all of them over every row
    is mostly zeros); elsewhere one part holds them all."""
    if not present:
        return None
    slot = {id(a): k for k, a in enumerate(present)}
    picks: Picks = []
    for i, sel in enumerate(current):
        mine = tuple((slot[id(a)], scale) for a, scale in sel or ()
                     if id(a) in slot and scale != 0.0)
        if mine:
            picks.append((i, mine))
    if not picks:
        return None
    ranks = [a.rank for a in present]
    if picks[-1][0] + 1 - picks[0][0] != len(picks):  # scattered rows: one part
        return [_part(picks, ranks, batch, contiguous=False)]
    return [_part(picks[a:b], ranks, batch, contiguous=True)
            for a, b in _cuts(picks, ranks)]


def _cuts(picks: Picks, ranks: list[int]) -> list[tuple[int, int]]:
    """Contiguous ranges of `picks` minimising the sum over parts of rows x the part's
    joined rank + PART_COST; cuts fall only between runs of rows with the same
    adapters (adjacent once sorted), so this stays small."""
    runs: list[tuple[int, int, frozenset[int]]] = []  # (start, end, slots) in picks
    for k, (_, mine) in enumerate(picks):
        slots = frozenset(s for s, _ in mine)
        if runs and runs[-1][2] == slots:
            runs[-1] = (runs[-1][0], k + 1, slots)
        else:
            runs.append((k, k + 1, slots))
    if len(runs) == 1:
        return [(0, len(picks))]
    best, cut = [0.0] + [math.inf] * len(runs), [0] * (len(runs) + 1)
    for j in range(1, len(runs) + 1):
        union: set[int] = set()
        rank = 0
        for i in range(j - 1, -1, -1):
            new = runs[i][2] - union
            union |= new
            rank += sum(ranks[k] for k in new)
            cost = best[i] + (runs[j - 1][1] - runs[i][0]) * rank + PART_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(runs)
    while j > 0:
        bounds.append((runs[cut[j]][0], runs[j - 1][1]))
        j = cut[j]
    return bounds[::-1]


def _part(picks: Picks, ranks: list[int], batch: int, contiguous: bool) -> _Part:
    """Rows, dense, span, mask (each row's scales on its adapters' columns of the joined
    rank, 0 elsewhere) and uniform scale for `picks`, joining only their adapters."""
    slots = tuple(sorted({k for _, mine in picks for k, _ in mine}))
    starts = [0]
    for k in slots:
        starts.append(starts[-1] + ranks[k])
    local = {k: j for j, k in enumerate(slots)}
    by_row = {}
    for i, mine in picks:
        row = [0.0] * starts[-1]
        for k, scale in mine:
            for c in range(starts[local[k]], starts[local[k] + 1]):
                row[c] += scale
        by_row[i] = row
    # side by side: compute that slice, no gather or scatter; scattered but most rows
    # adapted: every row (a plain row's scales are 0), which saves the gather, the
    # scatter and the delta's memory; only a few: just theirs
    span = slice(picks[0][0], picks[-1][0] + 1) if contiguous else slice(0, batch)
    dense = contiguous or 2 * len(picks) >= batch
    rows_ = list(range(span.start, span.stop)) if dense else [i for i, _ in picks]
    zero = [0.0] * starts[-1]
    uses = {mine for _, mine in picks}
    only = next(iter(uses))
    uniform = (only[0][1] if len(uses) == 1 and len(only) == 1 and len(rows_) == len(picks)
               else None)
    return _Part(torch.tensor(rows_), dense, span,
                 torch.tensor([by_row.get(i, zero) for i in rows_]), uniform, slots)


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
