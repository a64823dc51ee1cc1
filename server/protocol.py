"""Wire types of the OpenAI Images API plus stepserve's flat extensions.

See docs/openai-api.md.  Unknown fields are rejected so a
typo in an extension name is an error naming the field, not a silent default.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = "auto"
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
    num_inference_steps: int | None = Field(None, ge=1, le=100)
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
    cache: str | dict[str, str | int | float | None] | None = None

    @field_validator("size")
    @classmethod
    def _size_shape(cls, v: str | None) -> str | None:
        if v is None or v == "auto" or SIZE_RE.match(v):
            return v
        raise ValueError("size must be 'WIDTHxHEIGHT' (e.g. '32x32') or 'auto'")


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


def usage_for(prompt: str, n: int, image_tokens: int) -> Usage:
    text_tokens = len(prompt.split())
    return Usage(input_tokens=text_tokens, output_tokens=n * image_tokens,
                 total_tokens=text_tokens + n * image_tokens,
                 input_tokens_details={"text_tokens": text_tokens, "image_tokens": 0})
