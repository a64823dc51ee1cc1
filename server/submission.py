"""What the API edge keeps for a submitted request, whichever backend runs it."""

from __future__ import annotations

from dataclasses import dataclass

from .scheduler.backend import Handle
from .scheduler.request import GenerationParams


@dataclass(eq=False)
class Submission:
    """A submitted request as the API edge tracks it: the backend's handle plus what
    only the edge needs (the result-cache key and usage accounting)."""

    handle: Handle
    result_key: str | None = None  # exact-result-cache key (requests with a seed)
    image_tokens: int = 0  # usage: output tokens per image of the served model's size
    from_cache: bool = False  # answered from the exact result cache (nothing ran)

    @property
    def params(self) -> GenerationParams:
        return self.handle.params


@dataclass(frozen=True)
class OutputSpec:
    """How finished images are returned."""

    response_format: str
    output_format: str
    compression: int | None
    size: str
    upscale: int
    warnings: tuple[str, ...] = ()  # said in the answer's `stepserve` block
