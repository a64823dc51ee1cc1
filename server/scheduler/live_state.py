"""Live request state, made explicit and bounded: its bytes, the budget on them, and
where a paused request's state lives.

A running request's state (latents, the last clean-sample prediction, its prompt
encodings, step-cache history, an edit's source) stays on the device between its
steps. A request is *paused* (preempted) when it ran in one forward and is left out of
the next because higher-ranked work took the batch. Past the byte budget, paused
state moves to host memory where the engine runs on a GPU (pinned, async copies) and
comes back before its next forward; otherwise new requests wait for admission (their
state is built only then). Sampler history, cache state and the preview schedule are
kept untouched, so a resumed request gives the image an unpaused one would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from .request import Request

# the per-request tensors of a row state (both the built-in flow state and diffusers');
# its LoRA adapters are the library's shared weights and stay where they are
PER_REQUEST = ("x", "x0", "cond", "uncond", "cache_state", "row_caches", "source")


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensors reachable through dataclass fields, tuples, lists and dicts
    (each storage counted once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    if isinstance(obj, tuple | list):
        return sum(tensor_bytes(v, seen) for v in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    return 0


def state_bytes(states: Iterable[Any]) -> int:
    seen: set[int] = set()
    return sum(tensor_bytes(vars(s).get(name), seen) for s in states for name in PER_REQUEST)


def move(obj: Any, device: torch.device) -> Any:
    """The same structure with its tensors on `device`; host copies of device tensors
    are pinned and made without waiting (the stream orders them before any use)."""
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        if device.type == "cpu" and obj.device.type == "cuda":
            host = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
            return host.copy_(obj, non_blocking=True)
        return obj.to(device, non_blocking=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        init = {f.name for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **{k: move(v, device) for k, v in vars(obj).items()
                                           if k in init})
    if isinstance(obj, tuple) and type(obj) is not tuple:  # a NamedTuple: fields by position
        return type(obj)(*(move(v, device) for v in obj))
    if isinstance(obj, tuple | list):
        return type(obj)(move(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def move_states(states: list[Any], device: torch.device) -> list[Any]:
    return [dataclasses.replace(s, **{k: move(v, device) for k, v in vars(s).items()
                                      if k in PER_REQUEST}) for s in states]


class LiveState:
    """The budget on live request state and the record of pauses. `offload`: paused
    state may move to `host` (engines on a GPU); without it new admissions wait."""

    def __init__(self, budget_bytes: int | None, device: torch.device, offload: bool
                 ) -> None:
        self.budget = budget_bytes
        self.device = device
        self.host = torch.device("cpu")
        self.offload = offload
        self.row_bytes = 0  # the last measured state of one row: admission's estimate
        self._last_batch: set[str] = set()

    def measure(self, req: Request) -> None:
        req.state_bytes = state_bytes(req.states)
        if req.states:
            self.row_bytes = max(1, req.state_bytes // len(req.states))

    def on_device(self, running: Iterable[Request]) -> int:
        return sum(r.state_bytes for r in running if not r.offloaded)

    def room_for(self, rows: int, running: list[Request], admitted_rows: int) -> bool:
        """Whether a request of `rows` rows may be admitted now (always, when nothing
        runs: a budget smaller than one request must not stop the server). With offload
        the running requests' state can leave the device when paused, so only the new
        ones must fit (host memory is bounded by max_queue)."""
        if self.budget is None or (not running and not admitted_rows):
            return True
        if not self.row_bytes:  # no state measured yet: one request first, then estimates
            return False
        resident = 0 if self.offload else self.on_device(running)
        return resident + (admitted_rows + rows) * self.row_bytes <= self.budget

    def paused(self, batch: list[Request], running: list[Request], now: float
               ) -> tuple[int, list[float]]:
        """Record who was paused (ran last forward, left out of this one) and who
        resumes: (requests newly paused, seconds paused of those resuming)."""
        ids = {r.id for r in batch}
        newly, resumed = 0, []
        for req in running:
            if req.id not in ids and req.id in self._last_batch:
                req.paused_at, req.preemptions = now, req.preemptions + 1
                newly += 1
            elif req.id in ids and req.paused_at is not None:
                resumed.append(now - req.paused_at)
                req.paused_at = None
        self._last_batch = ids
        return newly, resumed

    def offload_paused(self, batch: list[Request], running: list[Request]) -> int:
        """Past the budget, move paused requests' state to the host, the lowest-ranked
        (last in `running`, which is in policy order) first; the rows moved."""
        if not self.offload or self.budget is None:
            return 0
        ids = {r.id for r in batch}
        over = self.on_device(running) - self.budget
        moved = 0
        for req in reversed(running):
            if over <= 0:
                break
            if req.id in ids or req.offloaded or not req.states:
                continue
            req.states = move_states(req.states, self.host)
            req.offloaded = True
            over -= req.state_bytes
            moved += req.samples
        return moved

    def restore(self, batch: list[Request]) -> int:
        """Bring offloaded state back before its forward; the rows moved."""
        moved = 0
        for req in batch:
            if req.offloaded:
                req.states = move_states(req.states, self.device)
                req.offloaded = False
                moved += req.samples
        return moved
