"""What the core loop reports per request; the API edge turns these into responses.

A request that does not complete ends with a `FinishReason`, never an HTTP status:
the one table that maps reasons to status codes lives at the API edge
(server/errors.py), so the scheduler and its backends stay protocol-free.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class FinishReason(enum.Enum):
    """Why a request ended without images (its images are the `Completed` event)."""

    CANCELLED = "cancelled"  # the client went away, or the job was cancelled elsewhere
    TIMEOUT = "timeout"  # past the request's own deadline
    REJECTED = "rejected"  # no room: the queue was full when it reached the core
    INVALID = "invalid"  # the request itself cannot run (e.g. a schedule the sampler refuses)
    ERROR = "error"  # the engine or the runner failed on it
    UNAVAILABLE = "unavailable"  # the job backend failed or lost it (e.g. Redis restarted)


@dataclass(frozen=True)
class Preview:
    request_id: str
    index: int  # 0-based partial image index
    step: int
    images: np.ndarray  # uint8 (n, H, W, 3): decoded clean-image predictions


@dataclass(frozen=True)
class Completed:
    request_id: str
    images: np.ndarray  # uint8 (n, H, W, 3)
    steps: int  # the steps it ran
    cache: str | None = None  # the step-cache policy it ran with
    level: str | None = None  # `quality: auto`'s plan ("asked", "high", ...)


@dataclass(frozen=True)
class Failed:
    request_id: str
    reason: FinishReason
    message: str
    code: str | None = None  # a more specific error code (None: the reason's default)


Event = Preview | Completed | Failed
