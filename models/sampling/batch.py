"""The one batched denoising step, for every model kind.

Per request image a state object carries its sample, step, prompts, guidance and
cache state; a `StepModel` supplies only what differs between model kinds: which
states add an unconditional row, the batched forward over rows, and the solver
step. Everything per row is written once, here: which states skip the forward (a
step-level cache predicts their output instead), the row layout (conditional rows
for every computing state, then unconditional rows for the guided ones), guidance
mixing, the step cache's record/predict, and the advance that also yields the x0
preview. The built-in flow model (sampling/state.py) and every diffusers family
(families/sampler.py) use it; so does ParaDiGMS, through `guided_outputs`.

Why not diffusers' pipelines: their loop runs one trajectory, and their
schedulers keep its position in the scheduler object (`_step_index`); requests at
different steps in one forward need per-request state, so the loop is ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

import torch

from ..caches.config import CacheConfig, ForwardCache, StepCache
from ..lora import apply as lora


class RowState(Protocol):
    """What the batched step reads on a request image's state: a frozen dataclass, whose
    new versions the step makes with `dataclasses.replace`."""

    @property
    def x(self) -> torch.Tensor: ...

    @property
    def step(self) -> int: ...

    @property
    def guidance(self) -> float: ...

    @property
    def cond(self) -> Any: ...  # one prompt's encoding (the model's text type)

    @property
    def uncond(self) -> Any: ...

    @property
    def x0(self) -> torch.Tensor | None: ...

    @property
    def cache(self) -> CacheConfig | None: ...

    @property
    def cache_state(self) -> Any: ...  # a StepCache's state

    @property
    def row_caches(self) -> tuple[Any, Any] | None: ...  # a ForwardCache's rows (cond, uncond)

    @property
    def source(self) -> Any: ...  # an edit's Source (edit.py), or None

    @property
    def lora(self) -> Any: ...  # its LoRA adapters and scales (lora.apply.Adapters) or None

    @property
    def steps(self) -> int: ...

    @property
    def done(self) -> bool: ...

    @property
    def t(self) -> float: ...


S = TypeVar("S", bound=RowState)


@dataclass(frozen=True)
class Row(Generic[S]):
    """One row of the batched forward: a state's conditional (branch 0) or
    unconditional (branch 1) half."""

    state: S
    branch: int

    @property
    def text(self) -> Any:
        return self.state.cond if self.branch == 0 else self.state.uncond

    @property
    def cache(self) -> Any:
        """This row's forward-cache state, or None."""
        caches = self.state.row_caches
        return None if caches is None else caches[self.branch]


class StepModel(Protocol[S]):
    """What a model kind supplies to the batched step."""

    def cfg_rows(self, state: S) -> bool:
        """Whether this state adds an unconditional row (classifier-free guidance)."""

    def forward(self, rows: list[Row[S]]) -> tuple[torch.Tensor, list[Any]]:
        """ONE denoiser forward over the rows (which may be at different steps, prompts,
        guidance): float32 CPU outputs (rows, ...) and each row's new forward-cache
        state (None for rows without one)."""

    def advance(self, state: S, out: torch.Tensor) -> S:
        """The solver step with the (guided) model output: step + 1, new x and x0."""

    def keep(self, state: S) -> S:
        """Inpainting: the state with its unmasked region put back on the source's
        trajectory at the state's current step."""


def cache_states(cache: CacheConfig | None) -> tuple[Any, tuple[Any, Any] | None]:
    """A request image's fresh (step-cache state, forward-cache row states)."""
    if isinstance(cache, StepCache):
        return cache.new_state(), None
    if isinstance(cache, ForwardCache):
        return None, (cache.new_row_state(), cache.new_row_state())
    return None, None


def with_cache(state: S, cache: CacheConfig) -> S:
    """The state with a fresh cache from its next step on (`quality: auto` switching a
    request that has fallen behind to the model's safe cache)."""
    cache_state, rows = cache_states(cache)
    return replace(state, cache=cache, cache_state=cache_state,  # type: ignore[type-var]
                   row_caches=rows)


def skipped_blocks(state: RowState) -> float:
    """Blocks a forward cache has reused for this state so far."""
    caches = state.row_caches
    return sum(c.skipped_blocks for c in caches) if caches else 0.0


def needs_forward(state: RowState) -> bool:
    """False when the state's step cache predicts this step's output instead."""
    cache = state.cache
    if not isinstance(cache, StepCache):
        return True
    return cache.must_compute(state.cache_state, state.step, state.steps, state.t)


def apply_guidance(out_cond: torch.Tensor, out_uncond: torch.Tensor,
                   scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance with a per-row scale."""
    return out_uncond + scale.to(out_cond.dtype).view(-1, *([1] * (out_cond.dim() - 1))) * (
        out_cond - out_uncond)


def guided_outputs(model: StepModel[S], states: Sequence[S]
                   ) -> tuple[list[torch.Tensor], list[S]]:
    """One forward for all states: each state's (guided) model output, and the states
    with their forward-cache rows updated."""
    if not states:
        return [], []
    guided = [i for i, s in enumerate(states) if model.cfg_rows(s)]
    rows = [Row(s, 0) for s in states] + [Row(states[i], 1) for i in guided]
    out, new_rows = _lora_ordered_forward(model, rows)
    states = list(states)
    uncond_row = {i: len(states) + k for k, i in enumerate(guided)}
    for i, s in enumerate(states):
        if s.row_caches is not None:
            j = uncond_row.get(i)
            states[i] = replace(s, row_caches=(new_rows[i], s.row_caches[1] if j is None
                                                else new_rows[j]))  # type: ignore[type-var]
    mixed = out[:len(states)].clone()
    if guided:
        scale = torch.tensor([states[i].guidance for i in guided])
        mixed[guided] = apply_guidance(mixed[guided], out[len(states):], scale)
    return [mixed[k].clone() for k in range(len(states))], states  # not views of the batch


def _lora_ordered_forward(model: StepModel[S], rows: list[Row[S]]
                          ) -> tuple[torch.Tensor, list[Any]]:
    """model.forward(rows) with each row's LoRA adapters. Rows with adapters go first,
    those with the same adapters side by side (then put back in order): the low-rank
    path then runs on one contiguous slice of the batch, which needs no gather and
    skips the plain rows (lora.apply)."""
    same = list(range(len(rows)))
    order = sorted(same, key=lambda i: (not rows[i].state.lora,
                                        lora.adapters_key(rows[i].state.lora))
                   ) if any(r.state.lora for r in rows) else same
    if order == same:  # already in that order (no adapters, or one set)
        with lora.rows([r.state.lora for r in rows]):
            return model.forward(rows)
    with lora.rows([rows[i].state.lora for i in order]):
        out, new = model.forward([rows[i] for i in order])
    back = sorted(same, key=order.__getitem__)  # each row's place in `order`
    return out[back], [new[k] for k in back]


def step_batch(model: StepModel[S], states: Sequence[S]) -> list[S]:
    """Advance every (unfinished) state by one step with at most ONE batched forward;
    states whose step cache skips this step take no row in it."""
    if any(s.done for s in states):
        raise ValueError("cannot step a finished state")
    need = [i for i, s in enumerate(states) if needs_forward(s)]
    outs, computed = guided_outputs(model, [states[i] for i in need])
    row = {i: k for k, i in enumerate(need)}
    result = []
    for i, s in enumerate(states):
        cache = s.cache
        if i in row:
            s, out = computed[row[i]], outs[row[i]]
            if isinstance(cache, StepCache):
                s = replace(s, cache_state=cache.record(s.cache_state, s.t, out))  # type: ignore[type-var]
        else:
            assert isinstance(cache, StepCache)
            out = cache.predict(s.cache_state, s.t)
            s = replace(s, cache_state=cache.skipped(s.cache_state))  # type: ignore[type-var]
        s = model.advance(s, out)
        if s.source is not None and s.source.mask is not None:
            s = model.keep(s)
        result.append(s)
    return result
