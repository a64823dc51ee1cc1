"""Wire types of the OpenAI Images API plus stepserve's flat extensions.

See docs/openai-api.md.  Unknown fields are rejected so a
typo in an extension name is an error naming the field, not a silent default.
Types are strict on the wire: `n: "2"`, `n: true`, `n: 2.5` or `stream: 1` are errors,
not coerced. A JSON number is taken as it is: `n: 2.0` is the integer 2 (JSON Schema's
rule) and `guidance_scale: 2` the number 2.0. NaN and infinities are refused.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# ASCII digits only, nothing before or after (use with fullmatch: `$` would allow "\n")
SIZE_RE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
SIZE_PATTERN = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"  # the same, as the OpenAPI schema says it
MAX_N = 10  # OpenAI's bound; the server's max_batch_size may be lower (checked in resolve)
MAX_STEPS = 100  # the largest max_steps a server can have (checked in resolve)
Name = Annotated[str, Field(max_length=64)]
CacheKnob = Name | int | float | bool | None


MAX_LORAS = 16  # the most a request may name; the server's max_loras_per_request may be lower


class LoraSpec(BaseModel):
    """One LoRA adapter for a request: a name listed at GET /v1/loras and its weight."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=128)
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = Field(None, max_length=256)
    # upper bounds of n and num_inference_steps depend on the server: resolve() checks
    # them, so every out-of-range value gets the same message naming the server's limit
    n: int = Field(1, ge=1, json_schema_extra={"maximum": MAX_N},
                   description=f"1-{MAX_N}, and at most the server's max_batch_size")
    size: str | None = Field("auto", json_schema_extra={"pattern": SIZE_PATTERN})
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    user: str | None = Field(None, max_length=256)
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=3)
    # flat extensions (SGLang-Diffusion / vLLM-Omni names, then stepserve's own)
    num_inference_steps: int | None = Field(
        None, ge=1, json_schema_extra={"maximum": MAX_STEPS},
        description="at most the server's max_steps (itself at most 100)")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0)
    negative_prompt: str | None = Field(None, max_length=4000)
    sampler: str | None = Field(None, max_length=32)  # checked against the served model
    priority: int = Field(0, ge=-100, le=100)
    timeout: float | None = Field(None, gt=0, le=3600)
    # custom schedules (diffusers models): explicit timesteps or sigmas, or a named one
    timesteps: list[int] | None = Field(None, min_length=1, max_length=100)
    sigmas: list[float] | None = Field(None, min_length=1, max_length=101)
    schedule: Literal["ays"] | None = None  # Align Your Steps (10 steps, SD / SDXL)
    # latency: while the server is otherwise idle, spend idle batch slots on ParaDiGMS
    mode: Literal["latency", "throughput"] | None = None
    # step cache: a policy name, or {"policy": ..., "order": 2, "interval": 2, ...}
    cache: Name | Annotated[dict[Name, CacheKnob], Field(max_length=16)] | None = None
    # LoRA adapters (GET /v1/loras), each with its scale; rows with different adapters
    # share one forward
    lora: list[LoraSpec] | None = Field(
        None, max_length=MAX_LORAS, description="at most the server's max_loras_per_request")

    @field_validator("n", "output_compression", "partial_images", "num_inference_steps",
                     "seed", "priority", "timesteps", mode="before")
    @classmethod
    def _integral(cls, v: object) -> object:
        """A JSON number with no fraction is an integer (JSON Schema's rule): 2.0 -> 2.
        Strings, booleans and 2.5 are left as they are, for the strict check to refuse."""
        if isinstance(v, list):
            return [cls._integral(x) for x in v]
        return int(v) if isinstance(v, float) and v.is_integer() else v

    @field_validator("size")
    @classmethod
    def _size_shape(cls, v: str | None) -> str | None:
        if v is None or v == "auto" or SIZE_RE.fullmatch(v):
            return v
        raise ValueError("must be 'WIDTHxHEIGHT' (e.g. '32x32') or 'auto'")


class ImageEditRequest(ImageGenerationRequest):
    """POST /v1/images/edits (multipart form): a generation request plus how far down
    the schedule the edit starts; the image and mask come as files."""

    strength: float = Field(0.75, gt=0, le=1, description="how much of the schedule the "
                            "edit runs: 1.0 starts from pure noise, 0.3 changes little")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int]


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: str | None = None
    output_format: str | None = None
    quality: str | None = None
    size: str | None = None
    usage: Usage | None = None
    stepserve: dict[str, Any] | None = None  # what ran: quality, level, steps, cache


def usage_for(prompt: str, n: int, image_tokens: int) -> Usage:
    text_tokens = len(prompt.split())
    return Usage(input_tokens=text_tokens, output_tokens=n * image_tokens,
                 total_tokens=text_tokens + n * image_tokens,
                 input_tokens_details={"text_tokens": text_tokens, "image_tokens": 0})


class ErrorDetail(BaseModel):
    message: str
    type: str  # follows the status: invalid_request_error, not_found_error, ...
    param: str | None  # the request field at fault, if one is
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error response (the OpenAI shape)."""

    error: ErrorDetail


class JobProgress(BaseModel):
    step: int
    total_steps: int
    fraction: float


class ImageJob(BaseModel):
    """An asynchronous job as POST / GET / DELETE /v1/jobs answer it."""

    id: str
    object: Literal["image.job"]
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    created_at: int
    queue_position: int | None
    progress: JobProgress | None
    result: ImagesResponse | None  # when completed
    error: ErrorDetail | None  # when failed


class ImageJobList(BaseModel):
    object: Literal["list"]
    data: list[ImageJob]
    has_more: bool
