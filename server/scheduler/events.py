"""What the core loop reports per request; the async edge turns these into responses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    steps: int


@dataclass(frozen=True)
class Failed:
    request_id: str
    status_code: int  # HTTP status the API should answer with
    code: str  # OpenAI-style error code
    message: str


Event = Preview | Completed | Failed

# Failed.code of a request cancelled elsewhere (e.g. a job cancelled through another
# API replica): the request ends as cancelled, not as an error.
CANCELLED = "cancelled"
