"""POST /v1/images/edits (and /v1/jobs/edits): img2img and inpainting in the OpenAI
shape (multipart/form-data), run through the same step batch as generations.

The form's fields are those of a generation plus `strength`; `image` (or `image[]`)
is the source and `mask` an optional PNG whose fully transparent pixels mark what may
change. Several sources (`image[]` repeated) are edited one by one with the same
prompt: the response holds `n` images of each, in upload order, and the mask applies
to the first (as OpenAI applies it). See server/edit_inputs.py for how they are read
and sized.
"""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from stepserve.models.sampling.edit import Edit

from .auth import quota_of
from .edit_inputs import form_body, read_image, read_mask
from .errors import APIError, error_responses, shown
from .generation import answer, require_ready, resolve, runtime_of
from .jobs import start_job
from .protocol import MAX_N, ImageEditRequest, ImagesResponse
from .runtime import Runtime, Served
from .scheduler.request import GenerationParams
from .submission import OutputSpec

router = APIRouter()
MAX_FIELDS = 64
MAX_FILES = MAX_N + 1  # every source its own image (n x sources <= MAX_N), and a mask


def form_schema() -> dict:
    """The multipart form in the OpenAPI document: the request's fields plus the files."""
    fields = ImageEditRequest.model_json_schema()
    props = {k: v for k, v in fields["properties"].items()
             if k not in ("cache", "timesteps", "sigmas")}  # sent as bracketed fields
    props["image"] = {"type": "string", "format": "binary",
                      "description": "the source: PNG, JPEG or WebP"}
    props["image[]"] = {"type": "array", "items": {"type": "string", "format": "binary"},
                        "maxItems": MAX_N, "description": "several sources instead of "
                        "`image`: each is edited, n images each, in this order"}
    props["mask"] = {"type": "string", "format": "binary", "description": "PNG with "
                     "alpha, the image's size: fully transparent pixels may change"}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "properties": props,
                   "required": ["prompt"]}}}}}


async def resolve_edit(request: Request, rt: Runtime
                       ) -> tuple[Served, GenerationParams, OutputSpec, ImageEditRequest]:
    require_ready(rt)
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise APIError(400, "edits are sent as multipart/form-data (the openai client's "
                       "images.edit does this)", None, "invalid_request")
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS)
    try:
        body, files = form_body(list(form.multi_items()), ImageEditRequest)
        try:
            req = ImageEditRequest.model_validate(body)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                          for e in exc.errors()], body=body) from exc
        served, params, spec = resolve(req, rt)
        caps = served.caps
        if not caps.edits:
            raise APIError(400, f"{served.name!r} does not take edits yet", "model",
                           "unsupported_value")
        unknown = sorted(set(files) - {"image", "mask"})
        if unknown:
            raise APIError(400, f"unexpected file field {shown(unknown[0])!r}: send `image` "
                           "(or `image[]`) and optionally `mask`", shown(unknown[0]),
                           "invalid_value")
        images = files.get("image", [])
        if not images:
            raise APIError(400, "give the source image as `image` (several as `image[]`)",
                           "image", "invalid_value")
        if len(files.get("mask", [])) > 1:
            raise APIError(400, "give at most one `mask`", "mask", "invalid_value")
        total = params.n * len(images)
        max_n = min(MAX_N, rt.settings.max_batch_size)
        if total > max_n:
            raise APIError(400, f"n x images ({params.n} x {len(images)}) must be at most "
                           f"{max_n} on this server", "image", "invalid_value")
        _, h, w = served.info.image_shape
        limit = rt.settings.max_image_pixels
        sources, sizes = [], []
        for i, upload in enumerate(images):
            field = "image" if len(images) == 1 else f"image[{i}]"
            source, size = read_image(await upload.read(), (w, h), limit, field)
            sources.append(source)
            sizes.append(size)
        original = sizes[0]
        mask = None
        if files.get("mask"):
            mask = read_mask(await files["mask"][0].read(), (w, h), original, limit)
        edit = Edit(sources[0], req.strength, mask, tuple(sources[1:]))
        params = dataclasses.replace(params, edit=edit, n=total, tenant=quota_of(request))
        return served, params, spec, req
    finally:
        await form.close()


@router.post("/v1/images/edits", response_model=None, openapi_extra=form_schema(), responses={
    200: {"model": ImagesResponse, "description": "The edited images; with `stream`, "
          "Server-Sent Events image_edit.partial_image / image_edit.completed",
          "content": {"text/event-stream": {}}},
    **error_responses(400, 404, 413, 429, 500, 503, 504,
                      e404="The model is not served here")})
async def edit(request: Request) -> Response:
    rt = runtime_of(request)
    served, params, spec, req = await resolve_edit(request, rt)
    return await answer(rt, request, served, params, spec, req, "image_edit")


@router.post("/v1/jobs/edits", status_code=202, openapi_extra=form_schema(), responses={
    **error_responses(400, 404, 413, 429, 503, 504, e404="The model is not served here",
                      e504="The job's `timeout` cannot be met (refused at once)")})
async def edit_job(request: Request) -> Response:
    rt = runtime_of(request)
    served, params, spec, req = await resolve_edit(request, rt)
    if req.stream:
        raise APIError(400, "jobs are polled, not streamed: drop `stream`", "stream",
                       "invalid_value")
    return start_job(rt, request, served, params, spec, seeded=req.seed is not None)
