"""Scheduler-side request state: parameters, status and per-image sampler states."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from stepserve.models.caches.config import CacheConfig
from stepserve.models.sampling.edit import Edit
from stepserve.models.sampling.state import SamplerState

if TYPE_CHECKING:
    from .plan import Plan


class Status(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    FAILED = 3
    CANCELLED = 4
    TIMED_OUT = 5

    @property
    def final(self) -> bool:
        return self >= Status.FINISHED


class LoraChoice(NamedTuple):
    """One adapter a request asks for; `digest` (its file's sha256, filled in by the API)
    keys cached results to the file's version."""

    name: str
    scale: float = 1.0
    digest: str = ""


@dataclass(frozen=True)
class GenerationParams:
    """A validated generation job; the HTTP layer builds it, the scheduler runs it."""

    prompt: str
    steps: int
    seed: int
    guidance: float
    n: int = 1
    negative_prompt: str = ""
    sampler: str | None = None  # None: the engine's default sampler
    priority: int = 0  # lower runs first (as in vLLM)
    timeout_s: float | None = None
    partial_images: int = 0
    cache: CacheConfig | None = None  # step-cache policy (None: no cache)
    schedule: tuple[tuple[str, tuple[float, ...]], ...] | None = None  # (("timesteps", ...),)
    mode: str = "throughput"  # "latency": ParaDiGMS rounds while the server is otherwise idle
    tenant: str = ""  # whose share of the queue it uses (an API key's id, or an address)
    edit: Edit | None = None  # img2img / inpainting source (models/sampling/edit.py)
    lora: tuple[LoraChoice, ...] = ()  # LoRA adapters applied to this request's rows
    quality: str | None = None  # the level asked: "low" / "medium" / "high" / "auto"
    level: str | None = None  # auto's chosen plan (quality.py); None until chosen
    ladder: tuple[Plan, ...] = ()  # auto's plans, best first, until one is chosen
    safe_cache: CacheConfig | None = None  # auto may switch it on part-way (once)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.n < 1 or self.partial_images < 0:
            raise ValueError("steps and n must be >= 1, partial_images >= 0")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")


def preview_steps(steps: int, partial_images: int) -> tuple[int, ...]:
    """Completed-step counts after which a preview is due: k evenly spread, never the last."""
    if steps < 2 or partial_images < 1:
        return ()
    due = {min(steps - 1, max(1, round((i + 1) * steps / (partial_images + 1))))
           for i in range(partial_images)}
    return tuple(sorted(due))


@dataclass(eq=False)
class Request:
    id: str
    params: GenerationParams
    arrival: float
    status: Status = Status.WAITING
    states: list[SamplerState] = field(default_factory=list)
    last_served: float = 0.0
    previews_sent: int = 0
    first_preview_at: float | None = None
    first_step_at: float | None = None
    picard: Any = None  # a PicardState while running in latency mode
    predicted_s: float | None = None  # admission's forecast of its time to finish
    degraded: str | None = None  # why auto runs it below what it asked: "load" / "behind"
    state_bytes: int = 0  # its live state (live_state.py), measured after each forward
    offloaded: bool = False  # its paused state is in host memory
    paused_at: float | None = None  # when it was left out of a forward it had been in
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.last_served = self.arrival
        self.due_previews = preview_steps(self.params.steps, self.params.partial_images)

    @property
    def deadline(self) -> float | None:
        t = self.params.timeout_s
        return None if t is None else self.arrival + t

    @property
    def step(self) -> int:
        return self.states[0].step if self.states else 0

    @property
    def samples(self) -> int:
        return self.params.n
