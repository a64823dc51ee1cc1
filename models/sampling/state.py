"""The built-in flow model's per-request sampler state, and its `StepModel` for the
one batched step (batch.py): the shortcut-aware Euler solver with optional Q-Sched.

Why not diffusers' schedulers: they keep one trajectory's position in the
scheduler object (`_step_index`), so one instance cannot advance requests that
sit at different steps in one batch. Here each request carries its own state
and the step functions (flow.py) are pure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..builtin.shapes import to_tensor
from ..builtin.text import TextBatch
from ..caches.config import CacheConfig
from ..lora import apply as lora_apply
from ..lora.apply import Adapters
from . import batch
from .batch import Row, needs_forward
from .edit import Edit, Source, mask_tensor, start_step
from .flow import euler_step, predict_x0
from .qsched import QSched
from .schedules import flow_timesteps

__all__ = ["SAMPLERS", "BlockDenoiser", "Denoiser", "FlowStepModel", "SamplerState", "advance",
           "guided_velocity", "init_state", "needs_forward", "run_to_completion", "step_batch"]

# v = denoiser(x, t, d, text): one batched forward; members may differ in t, d and text.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TextBatch], torch.Tensor]
# (v, new row states) = block_denoiser(x, t, d, text, rows): the same forward with per-row
# block caches (models/caches/block_cache.py; engines that run DiT blocks themselves)
BlockDenoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TextBatch, list[Any]],
                         tuple[torch.Tensor, list[Any]]]

SAMPLERS = ("euler", "flow-euler")


@dataclass(frozen=True)
class SamplerState:
    """One request image's trajectory.  `x` is (C, H, W); times run 1 -> 0."""

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
    cache_state: Any = field(default=None, repr=False)
    row_caches: tuple[Any, Any] | None = field(default=None, repr=False)
    source: Source | None = field(default=None, repr=False)  # an edit's source
    lora: Adapters | None = field(default=None, repr=False)  # LoRA adapters and scales

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if len(self.times) < 2 or any(a <= b for a, b in zip(self.times, self.times[1:])):
            raise ValueError("times must decrease and hold at least two entries")
        if len(self.cond) != 1 or len(self.uncond) != 1:
            raise ValueError("cond and uncond hold exactly one prompt each")

    @property
    def skipped_blocks(self) -> float:
        return batch.skipped_blocks(self)

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
               cache: CacheConfig | None = None, edit: Edit | None = None,
               lora: Adapters | None = None, noise_scale: float = 1.0) -> SamplerState:
    """A request image's state; with an `edit`, it starts at the edit's start step from
    the source noised to that time (img2img), keeping the unmasked region on the
    source's trajectory (inpainting). Text-to-image starts from the seed's noise times
    `noise_scale` (a lower sampling temperature: the model card's default); an edit's
    source is noised with the unscaled noise, as in training."""
    cache = cache if cache is not None and cache.enabled else None
    cache_state, row_caches = batch.cache_states(cache)
    times = tuple(flow_timesteps(steps, time_shift))
    noise = initial_noise(seed, shape)
    x, step, source = noise * noise_scale if noise_scale != 1.0 else noise, 0, None
    if edit is not None:
        x0 = to_tensor(edit.image[None].copy())[0]  # a writable copy for torch
        if tuple(x0.shape) != tuple(shape):
            raise ValueError(f"the edit's image is {tuple(x0.shape)}, the model makes "
                             f"{tuple(shape)}")
        step = start_step(steps, edit.strength)
        x = flow_noised(x0, noise, times[step])
        mask = None if edit.mask is None else mask_tensor(edit.mask, (shape[1], shape[2]))
        source = Source(x0, noise, mask)
    return SamplerState(x=x, times=times, step=step,
                        cond=cond, uncond=uncond, guidance=guidance, sampler=sampler,
                        qsched=None if qsched is None or qsched.identity else qsched,
                        cache=cache, cache_state=cache_state, row_caches=row_caches,
                        source=source, lora=lora or None)


def flow_noised(x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """The flow path at time t: x_t = (1 - t) x0 + t noise."""
    return (1.0 - t) * x0 + t * noise


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


@dataclass(frozen=True)
class FlowStepModel:
    """The built-in model's part of the batched step: rows (x, t, d, text) into the
    denoiser (or, with block caches, the block-cached forward), and the Euler step."""

    denoiser: Denoiser
    device: torch.device | str = "cpu"
    block_denoiser: BlockDenoiser | None = None
    # where `denoiser` is a built graph (onnxruntime, TensorRT) with the weights inside:
    # the torch forward that rows with LoRA adapters take instead
    lora_denoiser: Denoiser | None = None

    def cfg_rows(self, state: SamplerState) -> bool:
        return state.uses_guidance

    def forward(self, rows: list[Row[SamplerState]]) -> tuple[torch.Tensor, list[Any]]:
        dev = self.device
        x = torch.stack([r.state.x for r in rows]).to(dev)
        t = torch.tensor([r.state.t for r in rows], device=dev)
        d = torch.tensor([r.state.d for r in rows], device=dev)
        text = TextBatch.cat([r.text for r in rows]).to(dev)
        if any(r.state.row_caches is not None for r in rows):
            if self.block_denoiser is None:
                raise ValueError("a block cache needs an engine that runs the DiT blocks "
                                 "itself")
            from ..caches.block_cache import BlockCache, RowCache

            caches = [RowCache(r.state.cache, r.cache, r.state.step, r.state.steps)
                      if isinstance(r.state.cache, BlockCache) else None for r in rows]
            v, new = self.block_denoiser(x, t, d, text, caches)
        elif self.lora_denoiser is not None and any(r.state.lora for r in rows):
            v, new = self._split_lora(rows, x, t, d, text), [None] * len(rows)
        else:
            v, new = self.denoiser(x, t, d, text), [None] * len(rows)
        return v.float().cpu(), new

    def _split_lora(self, rows: list[Row[SamplerState]], x: torch.Tensor, t: torch.Tensor,
                    d: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Adapter rows through the torch forward, the others through the graph."""
        assert self.lora_denoiser is not None
        adapted = [i for i, r in enumerate(rows) if r.state.lora]
        plain = [i for i, r in enumerate(rows) if not r.state.lora]
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        with lora_apply.subset(adapted):
            out[adapted] = self.lora_denoiser(x[adapted], t[adapted], d[adapted],
                                              text.select(adapted)).float().to(x.device)
        if plain:
            out[plain] = self.denoiser(x[plain], t[plain], d[plain],
                                       text.select(plain)).float().to(x.device)
        return out

    def advance(self, state: SamplerState, out: torch.Tensor) -> SamplerState:
        return advance(state, out)

    def keep(self, state: SamplerState) -> SamplerState:
        """Inpainting: outside the mask, the source at this step's time."""
        src = state.source
        assert src is not None and src.mask is not None
        m = src.mask
        return replace(state, x=m * state.x + (1 - m) * flow_noised(src.x0, src.noise,
                                                                       state.t))


def guided_velocity(denoiser: Denoiser, states: Sequence[SamplerState],
                    device: torch.device | str = "cpu",
                    block_denoiser: BlockDenoiser | None = None
                    ) -> tuple[torch.Tensor, list[SamplerState]]:
    """One denoiser forward for all states: their (guided) velocities (N, C, H, W) and
    the states with their block caches updated."""
    outs, states = batch.guided_outputs(FlowStepModel(denoiser, device, block_denoiser),
                                        states)
    return torch.stack(outs), states


def step_batch(denoiser: Denoiser, states: Sequence[SamplerState],
               device: torch.device | str = "cpu",
               block_denoiser: BlockDenoiser | None = None) -> list[SamplerState]:
    """Advance every (unfinished) state by one step with at most ONE batched forward;
    states whose cache skips this step take no row in it."""
    return batch.step_batch(FlowStepModel(denoiser, device, block_denoiser), states)


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
