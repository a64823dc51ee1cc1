"""The synchronous scheduler core: admission, batch forming, one forward, retire.

It owns every live request and has no threads, sockets or device code: the
loop thread (loop.py) feeds it and drains its events, and tests drive it with
a fake engine.  Each `step()` runs at most ONE denoiser forward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from stepserve.engines.base import Engine
from stepserve.models.sampling.edit import composite

from .backend import QueueFull
from .deadlines import Deadlines, dropped
from .events import Completed, Event, Failed, FinishReason, Preview
from .forecast import Forecast, StepTimes
from .live_state import LiveState
from .policy import BatchPolicy
from .quality import plan
from .request import GenerationParams, Request, Status

log = logging.getLogger("stepserve.scheduler")

__all__ = ["QueueFull", "SchedulerConfig", "SchedulerCore", "StepStats"]


@dataclass(frozen=True)
class SchedulerConfig:
    batching: str = "step"  # "step": requests join/leave every step; "request": run to completion
    max_batch_size: int = 32
    max_queue: int = 256  # most requests waiting or running; beyond: QueueFull
    aging_s: float = 5.0
    queue_cost: float = 1024.0  # image-steps the queue holds (admission.py)
    queue_share: float = 0.5  # of queue_cost, the most one tenant may hold
    lora_batching: str = "mixed"  # policy.py
    deadlines: bool = True  # forecast admission, dropping and EDF (False: admit all, FIFO
    # within a class; the behaviour before them, kept to measure the difference)
    live_state_bytes: int | None = None  # budget on live request state (live_state.py)
    offload: bool | None = None  # paused state to host past it (None: on GPU engines)

    def __post_init__(self) -> None:
        if self.batching not in ("step", "request"):
            raise ValueError(f"batching must be 'step' or 'request', not {self.batching!r}")
        if self.lora_batching not in ("mixed", "split"):
            raise ValueError(f"lora_batching must be 'mixed' or 'split', not "
                             f"{self.lora_batching!r}")
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")


@dataclass
class StepStats:
    """What one iteration did; exporters (Prometheus) read these, the core never does."""

    batch_samples: int = 0
    batch_requests: int = 0
    forward_s: float = 0.0
    encode_s: float = 0.0
    admitted: int = 0
    waiting: int = 0
    running: int = 0
    finished: list[Request] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # cache policy -> skipped image-steps
    skipped_blocks: dict[str, float] = field(default_factory=dict)  # policy -> skipped blocks
    dropped: int = 0  # requests dropped: their deadline became unreachable
    revised: int = 0  # auto requests that took their safe cache part-way
    preempted: int = 0  # requests left out of this forward after running in the last
    paused_s: list[float] = field(default_factory=list)  # pauses that ended this step
    paused_rows: int = 0  # rows of running requests not in this forward
    offloaded_rows: int = 0  # rows whose state moved to the host / back this step
    restored_rows: int = 0
    state_waits: int = 0  # requests left waiting: the live-state budget was full
    live_bytes: int = 0  # live request state on the device after this step


class SchedulerCore:
    def __init__(self, engine: Engine, config: SchedulerConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.config = config
        self.policy = BatchPolicy(config.max_batch_size, config.aging_s, config.lora_batching,
                                  config.deadlines)
        self.clock = clock
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.last_stats = StepStats()
        self.default_sampler = engine.capabilities.default_sampler
        self.step_times = StepTimes()  # measured on `clock`, so a fake clock can drive it
        self.deadlines = Deadlines(self.policy, config.max_batch_size, self.step_times)
        device = torch.device(engine.info.device)
        offload = config.offload if config.offload is not None else device.type == "cuda"
        self.live = LiveState(config.live_state_bytes, device, offload)

    # -- intake ---------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if len(self.waiting) + len(self.running) >= self.config.max_queue:
            raise QueueFull(f"queue is full ({self.config.max_queue} requests)")
        if req.samples > self.config.max_batch_size:
            raise ValueError(f"n={req.samples} exceeds max batch size "
                             f"{self.config.max_batch_size}")
        self.plan(req, self.clock())  # auto requests their backend has not planned
        self.waiting.append(req)

    def cancel(self, request_id: str) -> Request | None:
        """Remove a request (e.g. its client went away); it leaves before the next forward."""
        for req in self.waiting + self.running:
            if req.id == request_id:
                self._retire(req, Status.CANCELLED)
                return req
        return None

    def _retire(self, req: Request, status: Status) -> None:
        for pool in (self.waiting, self.running):
            if req in pool:
                pool.remove(req)
        req.status = status

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one iteration --------------------------------------------------------------------
    def step(self) -> list[Event]:
        now = self.clock()
        stats = StepStats()
        events: list[Event] = self._expire(now, stats)
        if self.config.deadlines:
            self._revise(now, stats)
            events += self._drop_unreachable(now, stats)
        events += self._admit(now, stats)
        events += self._skip_ahead(stats)
        solo = self._latency_request()
        if solo is not None:
            events += self._picard(solo, stats)
        else:
            batch = self._pick(now)
            if batch:
                self._pause_and_resume(batch, now, stats)
                events += self._forward(batch, stats)
        stats.waiting, stats.running = len(self.waiting), len(self.running)
        stats.live_bytes = self.live.on_device(self.running)
        self.last_stats = stats
        return events

    def _expire(self, now: float, stats: StepStats) -> list[Event]:
        events: list[Event] = []
        for req in [r for r in self.waiting + self.running
                    if r.deadline is not None and now >= r.deadline]:
            self._retire(req, Status.TIMED_OUT)
            stats.finished.append(req)
            events.append(Failed(req.id, FinishReason.TIMEOUT,
                                 f"request timed out after {req.params.timeout_s:g} s "
                                 f"at step {req.step}/{req.params.steps}"))
        return events

    # -- deadlines ------------------------------------------------------------------------
    def rows_in_flight(self) -> int:
        return Deadlines.rows(list(self.waiting) + list(self.running))

    def forecast(self, params: GenerationParams, now: float) -> Forecast | None:
        """When a new request would finish, from the work ordered before it (read from
        another thread: list copies, no lock)."""
        return self.deadlines.forecast(list(self.waiting) + list(self.running), params, now)

    def plan(self, req: Request, now: float) -> None:
        """`quality: auto`: its plan, chosen once (quality.py)."""
        plan(req, lambda p: self.forecast(p, now), self.config.deadlines)

    def _revise(self, now: float, stats: StepStats) -> None:
        """Auto requests that have fallen behind take their model's safe cache (once)."""
        stats.revised += len(self.deadlines.behind(self.waiting + self.running, now))

    def _drop_unreachable(self, now: float, stats: StepStats) -> list[Event]:
        """Rows that can no longer finish before their deadline leave before they cost
        another forward (deadlines.py)."""
        events: list[Event] = []
        for req, need in self.deadlines.unreachable(self.waiting + self.running, now):
            self._retire(req, Status.TIMED_OUT)
            stats.finished.append(req)
            stats.dropped += 1
            events.append(dropped(req, need, now))
        return events

    def _admit(self, now: float, stats: StepStats) -> list[Event]:
        """Move waiting requests into the running set, encoding their prompts in one batch."""
        if self.config.batching == "request" and self.running:
            return []
        room = self.config.max_batch_size * (1 if self.config.batching == "request" else 4)
        room -= sum(r.samples for r in self.running)
        chosen: list[Request] = []
        rows = 0
        for req in self.policy.order(self.waiting, now):
            if req.samples > room:
                continue
            if not self.live.room_for(req.samples, self.running, rows):
                stats.state_waits += 1  # it waits, unbuilt, until state is freed
                continue
            chosen.append(req)
            room -= req.samples
            rows += req.samples
        if not chosen:
            return []
        start = time.perf_counter()
        try:
            prompts = [r.params.prompt for r in chosen] + [r.params.negative_prompt
                                                           for r in chosen]
            text = self.engine.encode(prompts)
        except Exception as exc:  # a bad prompt batch fails only these requests
            log.exception("text encoding failed")
            return self._fail(chosen, stats, exc)
        stats.encode_s = time.perf_counter() - start
        events: list[Event] = []
        for i, req in enumerate(chosen):
            try:  # a request whose state cannot be built fails alone, and only once
                req.states = self._init_states(req, text.select([i]),
                                               text.select([len(chosen) + i]))
            except ValueError as exc:  # its parameters: the request's own fault
                events += self._fail([req], stats, exc, FinishReason.INVALID)
                continue
            except Exception as exc:
                log.exception("building the sampler state failed for %s", req.id)
                events += self._fail([req], stats, exc)
                continue
            self.live.measure(req)
            req.status = Status.RUNNING
            self.waiting.remove(req)
            self.running.append(req)
            stats.admitted += 1
        return events

    def _init_states(self, req: Request, cond: Any, uncond: Any) -> list[Any]:
        p = req.params
        return [self.engine.init_state(p.seed + k, p.steps, cond, uncond, guidance=p.guidance,
                                       sampler=p.sampler or self.default_sampler,
                                       schedule=dict(p.schedule) if p.schedule else None,
                                       cache=p.cache,
                                       edit=p.edit.row(k, p.n) if p.edit else None,
                                       lora=[(c.name, c.scale) for c in p.lora])
                for k in range(p.n)]

    def _pick(self, now: float) -> list[Request]:
        if self.config.batching == "request":
            return list(self.running)
        return self.policy.pick(self.running, now)

    def _pause_and_resume(self, batch: list[Request], now: float, stats: StepStats) -> None:
        """Record preemptions; past the live-state budget paused state leaves the
        device; state of this batch's requests comes back first."""
        ranked = self.policy.order(self.running, now)
        stats.preempted, stats.paused_s = self.live.paused(batch, ranked, now)
        stats.paused_rows = sum(r.samples for r in self.running) - sum(r.samples
                                                                        for r in batch)
        stats.restored_rows += self.live.restore(batch)
        stats.offloaded_rows = self.live.offload_paused(batch, ranked)

    def _latency_request(self) -> Request | None:
        """Latency mode runs only while its request is alone: then the idle batch slots go
        to ParaDiGMS rounds; as soon as others wait it continues step by step."""
        alone = (self.config.batching == "step" and len(self.running) == 1
                 and not self.waiting)
        req = self.running[0] if self.running else None
        wants = (req is not None and req.params.mode == "latency" and req.samples == 1
                 and req.params.steps >= 8 and self.engine.capabilities.latency_mode
                 and req.params.cache is None
                 and not req.params.lora)  # ParaDiGMS rounds do not carry the row plan
        if alone and wants:
            return req
        for other in self.running:  # fall back from the converged prefix
            if other.picard is not None:
                other.states = [other.picard.as_sampler_state()]
                other.picard = None
        return None

    def _picard(self, req: Request, stats: StepStats) -> list[Event]:
        if req.picard is None:
            req.picard = self.engine.picard_init(req.states[0])
        before = req.picard.start
        start = time.perf_counter()
        try:
            self.engine.picard_round(req.picard)
        except Exception as exc:  # fail only this request
            log.exception("ParaDiGMS round failed for %s", req.id)
            return self._fail([req], stats, exc)
        stats.forward_s = time.perf_counter() - start
        stats.batch_samples, stats.batch_requests = req.picard.window, 1
        now = self.clock()
        events: list[Event] = []
        for step in range(before + 1, req.picard.start + 1):  # previews crossed this round
            state = req.picard.as_sampler_state()
            if step == req.picard.start or step in req.due_previews:
                state = replace(state, step=step, x=req.picard.xs[step])
                done_now = step == req.picard.steps
                events += self._advanced(req, [state], stats, now)
                if done_now or req not in self.running:
                    req.picard = None
                    break
        return events

    def _skip_ahead(self, stats: StepStats) -> list[Event]:
        """Advance, without a forward, every request whose cache skips its next step(s):
        it takes no batch slot for them."""
        events: list[Event] = []
        for req in list(self.running):
            try:
                if req.offloaded and not any(map(self.engine.needs_forward, req.states)):
                    stats.restored_rows += self.live.restore([req])  # predicted on device
                while req in self.running and not any(map(self.engine.needs_forward,
                                                          req.states)):
                    self._count_skips(req.states, stats)
                    new_states = self.engine.step_batch(req.states)  # runs no forward
                    events += self._advanced(req, new_states, stats, self.clock())
            except Exception as exc:  # fail only this request
                log.exception("cache step failed for %s", req.id)
                events += self._fail([req], stats, exc)
        return events

    def _count_skips(self, states: list, stats: StepStats) -> None:
        for s in states:
            if not self.engine.needs_forward(s):
                stats.skipped[s.cache.policy] = stats.skipped.get(s.cache.policy, 0) + 1

    def _forward(self, batch: list[Request], stats: StepStats) -> list[Event]:
        states = [s for r in batch for s in r.states]
        start, started = time.perf_counter(), self.clock()
        try:
            new_states = self.engine.step_batch(states)
        except Exception as exc:  # fail only this batch; the server keeps serving
            log.exception("denoiser forward failed for %d requests", len(batch))
            return self._fail(batch, stats, exc)
        stats.forward_s = time.perf_counter() - start
        self._count_skips(states, stats)
        for old, new in zip(states, new_states):
            if new.skipped_blocks > old.skipped_blocks:
                policy = new.cache.policy
                stats.skipped_blocks[policy] = (stats.skipped_blocks.get(policy, 0)
                                                + new.skipped_blocks - old.skipped_blocks)
        stats.batch_samples = sum(map(self.engine.needs_forward, states))
        stats.batch_requests = len(batch)
        now = self.clock()
        self.step_times.observe(stats.batch_samples, now - started)
        events: list[Event] = []
        offset = 0
        for req in batch:
            events += self._advanced(req, new_states[offset:offset + req.samples], stats, now)
            offset += req.samples
        return events

    def _advanced(self, req: Request, states: list, stats: StepStats, now: float
                  ) -> list[Event]:
        """Take a request's new states; emit its completion or a due preview."""
        req.states = states
        if req.step <= 4 or req.step % 8 == 0:  # its size settles in the first steps (x0,
            self.live.measure(req)  # cache history); 12 us a measure, so not every step
        req.last_served = now
        if req.first_step_at is None:
            req.first_step_at = now
        if req.states[0].done:
            images = self.engine.decode(torch.stack([s.x for s in req.states]))
            source = req.states[0].source
            if req.params.edit is not None and source is not None and source.mask is not None:
                images = composite(images, req.params.edit)  # outside the mask, exactly
            self._retire(req, Status.FINISHED)
            stats.finished.append(req)
            return [Completed(req.id, images, req.params.steps,
                              None if req.params.cache is None else req.params.cache.policy,
                              req.params.level)]
        if req.step in req.due_previews:
            x0 = torch.stack([s.x0 if s.x0 is not None else s.x for s in req.states])
            req.previews_sent += 1
            if req.first_preview_at is None:
                req.first_preview_at = now
            return [Preview(req.id, req.previews_sent - 1, req.step, self.engine.preview(x0))]
        return []

    def _fail(self, reqs: list[Request], stats: StepStats, exc: Exception,
              reason: FinishReason = FinishReason.ERROR) -> list[Event]:
        message = (f"{exc}" if reason is FinishReason.INVALID else
                   f"the engine failed on this request's batch: {type(exc).__name__}: {exc}")
        events: list[Event] = []
        for req in reqs:
            self._retire(req, Status.FAILED)
            stats.finished.append(req)
            events.append(Failed(req.id, reason, message))
        return events

