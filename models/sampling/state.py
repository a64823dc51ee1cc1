"""Per-request sampler state and the batched step over many such states.

Why not diffusers' schedulers: they keep one trajectory's position in the
scheduler object (`_step_index`), so one instance cannot advance requests that
sit at different steps in one batch.  Here each request carries its own state
and the step functions are pure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..builtin.text import TextBatch
from ..caches import ab_cache
from ..caches.block_cache import BlockState, RowCache
from ..caches.config import CacheConfig
from .flow import apply_guidance, euler_step, predict_x0
from .qsched import QSched
from .schedules import flow_timesteps

# v = denoiser(x, t, d, text): one batched forward; members may differ in t, d and text.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TextBatch], torch.Tensor]
# (v, new row states) = block_denoiser(x, t, d, text, rows): the same forward with per-row
# block caches (engines that run DiT blocks themselves, e.g. torch)
BlockDenoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TextBatch,
                          list[RowCache | None]],
                         tuple[torch.Tensor, list[BlockState | None]]]

SAMPLERS = ("euler", "flow-euler")


@dataclass(frozen=True)
class SamplerState:
    """One request's trajectory.  `x` is (C, H, W); times run 1 -> 0."""

    x: torch.Tensor
    times: tuple[float, ...]
    cond: TextBatch
    uncond: TextBatch
    guidance: float = 1.0
    sampler: str = "euler"
    step: int = 0
    x0: torch.Tensor | None = field(default=None, repr=False)
    qsched: QSched | None = None  # set when a quantized engine with Q-Sched serves
    cache: CacheConfig | None = None  # step-cache policy; its state below follows the request
    cache_state: ab_cache.ABState | None = field(default=None, repr=False)
    block_state: tuple[BlockState, BlockState] | None = field(default=None, repr=False)

    @property
    def skipped_blocks(self) -> float:
        return sum(b.skipped_blocks for b in self.block_state) if self.block_state else 0.0

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if len(self.times) < 2 or any(a <= b for a, b in zip(self.times, self.times[1:])):
            raise ValueError("times must decrease and hold at least two entries")
        if len(self.cond) != 1 or len(self.uncond) != 1:
            raise ValueError("cond and uncond hold exactly one prompt each")

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    @property
    def t(self) -> float:
        return self.times[self.step]

    @property
    def t_next(self) -> float:
        return self.times[self.step + 1]

    @property
    def d(self) -> float:
        """Step size the shortcut model is conditioned on; 0 asks for the plain velocity."""
        return self.t - self.t_next if self.sampler == "euler" else 0.0

    @property
    def uses_guidance(self) -> bool:
        return self.guidance != 1.0


def initial_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Seeded on the CPU so a seed gives the same image on every device."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def init_state(seed: int, steps: int, cond: TextBatch, uncond: TextBatch, *,
               shape: Sequence[int], guidance: float = 1.0, sampler: str = "euler",
               time_shift: float = 1.0, qsched: QSched | None = None,
               cache: CacheConfig | None = None) -> SamplerState:
    cache = cache if cache is not None and cache.enabled else None
    return SamplerState(x=initial_noise(seed, shape),
                        times=tuple(flow_timesteps(steps, time_shift)),
                        cond=cond, uncond=uncond, guidance=guidance, sampler=sampler,
                        qsched=None if qsched is None or qsched.identity else qsched,
                        cache=cache,
                        cache_state=ab_cache.ABState() if cache and not cache.block_level
                        else None,
                        block_state=(BlockState(), BlockState()) if cache and cache.block_level
                        else None)


def guided_velocity(denoiser: Denoiser, states: Sequence[SamplerState],
                    device: torch.device | str = "cpu",
                    block_denoiser: BlockDenoiser | None = None
                    ) -> tuple[torch.Tensor, list[SamplerState]]:
    """One denoiser forward for all states: conditional rows for every state plus
    unconditional rows only for the states that use guidance. Returns the (guided)
    velocities and the states with their block caches updated."""
    guided = [i for i, s in enumerate(states) if s.uses_guidance]
    rows = list(states) + [states[i] for i in guided]
    x = torch.stack([s.x for s in rows]).to(device)
    t = torch.tensor([s.t for s in rows], device=device)
    d = torch.tensor([s.d for s in rows], device=device)
    text = TextBatch.cat([s.cond for s in states] + [states[i].uncond for i in guided])
    states = list(states)
    if any(s.block_state is not None for s in states):
        if block_denoiser is None:
            raise ValueError("a block cache needs an engine that runs the DiT blocks itself")
        row_caches = [RowCache(s.cache, s.block_state[k], s.step, s.steps)
                      if s.block_state is not None else None
                      for k, s in [(0, s) for s in states] + [(1, states[i]) for i in guided]]
        v, new_rows = block_denoiser(x, t, d, text.to(device), row_caches)
        for i, s in enumerate(states):
            if s.block_state is not None:
                uncond = (new_rows[len(states) + guided.index(i)] if i in guided
                          else s.block_state[1])
                states[i] = replace(s, block_state=(new_rows[i], uncond))
    else:
        v = denoiser(x, t, d, text.to(device))
    v = v.float().cpu()
    out = v[:len(states)].clone()
    if guided:
        scale = torch.tensor([states[i].guidance for i in guided])
        out[guided] = apply_guidance(out[guided], v[len(states):], scale)
    return out, states


def advance(state: SamplerState, v: torch.Tensor) -> SamplerState:
    """Pure: the state after one Euler step with velocity v (C, H, W)."""
    t = torch.tensor([state.t])
    t_next = torch.tensor([state.t_next])
    x = state.x.unsqueeze(0)
    v = v.unsqueeze(0)
    if state.qsched is not None:
        c_model, c_sample = state.qsched.at(state.step, state.steps)
        x, v = c_sample * x, c_model * v
    return replace(state, x=euler_step(x, v, t, t_next)[0], step=state.step + 1,
                   x0=predict_x0(x, v, t)[0])


def needs_forward(state: SamplerState) -> bool:
    """False when the state's cache predicts this step's output instead of computing it."""
    if state.cache is None or state.cache_state is None:
        return True
    return ab_cache.must_compute(state.cache, state.cache_state, state.step, state.steps,
                                 state.t)


def step_batch(denoiser: Denoiser, states: Sequence[SamplerState],
               device: torch.device | str = "cpu",
               block_denoiser: BlockDenoiser | None = None) -> list[SamplerState]:
    """Advance every (unfinished) state by one step with at most ONE batched forward;
    states whose cache skips this step take no row in it."""
    if any(s.done for s in states):
        raise ValueError("cannot step a finished state")
    need = [i for i, s in enumerate(states) if needs_forward(s)]
    v_need, computed = (guided_velocity(denoiser, [states[i] for i in need], device,
                                        block_denoiser) if need else (None, []))
    row = {i: k for k, i in enumerate(need)}
    out = []
    for i, s in enumerate(states):
        if i in row:
            s, v = computed[row[i]], v_need[row[i]].clone()  # not a view of the batch
            if s.cache_state is not None:
                s = replace(s, cache_state=ab_cache.record(s.cache_state, s.t, v,
                                                           s.cache.order))
        else:
            v = ab_cache.predict(s.cache_state, s.t, s.cache.order)
            s = replace(s, cache_state=ab_cache.skipped(s.cache_state))
        out.append(advance(s, v))
    return out


def run_to_completion(denoiser: Denoiser, states: Sequence[SamplerState],
                      max_batch: int = 64, device: torch.device | str = "cpu",
                      block_denoiser: BlockDenoiser | None = None) -> list[SamplerState]:
    """Step-level batching in its simplest form: every iteration batches the
    unfinished states (they may be at different steps); finished ones leave."""
    states = list(states)
    while True:
        todo = [i for i, s in enumerate(states) if not s.done][:max_batch]
        if not todo:
            return states
        for i, s in zip(todo, step_batch(denoiser, [states[i] for i in todo], device,
                                         block_denoiser)):
            states[i] = s
