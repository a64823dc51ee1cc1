"""Reading an edit request's multipart form: typed fields, the source image and the mask,
decoded safely and converted to the model's size.

Images: PNG, JPEG or WebP; the pixel count is checked from the header before any
pixel is decoded (`max_image_pixels`; Pillow's decompression-bomb guard stays on),
EXIF orientation is applied, then the image is center-cropped to a square and
resized to the model's size (Lanczos). A mask is a PNG the size of the image whose
fully transparent pixels mark what may change (the OpenAI convention); it is cropped
and resized the same way, and a model pixel may change if any source pixel under it
may.
"""

from __future__ import annotations

import io
import json
import re
import types
import typing
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import APIError

FORMATS = ("PNG", "JPEG", "WEBP")
_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?|-?\.[0-9]+")


def _kinds(annotation: Any) -> set[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return {a for a in typing.get_args(annotation) if a is not type(None)}
    return {annotation}


def coerce(name: str, value: str, annotation: Any) -> Any:
    """A form field's text as the JSON value the request model expects (strictly: "2"
    is an integer where one is expected, "two" is a 400 naming the field)."""
    kinds = _kinds(annotation)
    if bool in kinds:
        if value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0"):
            return False
        raise APIError(400, f"{name} must be true or false", name, "invalid_value")
    if int in kinds and float not in kinds:
        if not _INT.fullmatch(value):
            raise APIError(400, f"{name} must be an integer", name, "invalid_value")
        return int(value)
    if float in kinds:
        if not _FLOAT.fullmatch(value):
            raise APIError(400, f"{name} must be a number", name, "invalid_value")
        return float(value)
    return value


def _number(value: str) -> Any:
    """A cache option's text: integers and numbers become numbers, the rest stays."""
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(value)
    return value


def form_body(items: list[tuple[str, Any]], model: type) -> tuple[dict[str, Any],
                                                                  dict[str, list[Any]]]:
    """(JSON body for `model`, uploaded files by field) from multipart items. Nested
    `cache[option]` fields become the `cache` object, `name[]` repeated fields lists."""
    body: dict[str, Any] = {}
    files: dict[str, list[Any]] = {}
    fields = model.model_fields
    for key, value in items:
        if not isinstance(value, str):  # an upload
            files.setdefault(key.removesuffix("[]"), []).append(value)
            continue
        m = re.fullmatch(r"cache\[([A-Za-z_]{1,64})\]", key)
        if m:
            cache = body.setdefault("cache", {})
            if not isinstance(cache, dict):
                raise APIError(400, "give cache as a name or as cache[option] fields",
                               "cache", "invalid_value")
            cache[m.group(1)] = _number(value)
        elif key == "lora" or key.startswith("lora["):
            _lora_field(body, key, value)
        elif key.endswith("[]") and key[:-2] in ("timesteps", "sigmas"):
            kind = int if key.startswith("timesteps") else float
            body.setdefault(key[:-2], []).append(coerce(key[:-2], value, kind))
        elif key in fields:
            body[key] = coerce(key, value, fields[key].annotation)
        else:
            body[key[:64]] = value  # the model refuses it, naming the field
    return body, files


def _lora_field(body: dict[str, Any], key: str, value: str) -> None:
    """`lora` as JSON text ('[{"name": "night", "scale": 0.8}]'), or one field per key:
    lora[0][name]=night, lora[0][scale]=0.8."""
    if key == "lora":
        try:
            body["lora"] = json.loads(value)
        except ValueError:
            raise APIError(400, "lora must be a JSON list of {name, scale} objects (or "
                           "lora[i][name] / lora[i][scale] fields)", "lora",
                           "invalid_value") from None
        return
    m = re.fullmatch(r"lora\[([0-9]{1,2})\]\[(name|scale)\]", key)
    entries = body.setdefault("lora", [])
    if m is None or not isinstance(entries, list):
        raise APIError(400, f"{key[:64]}: give lora as JSON or as lora[i][name] / "
                       "lora[i][scale] fields", "lora", "invalid_value")
    i = int(m.group(1))
    if i > len(entries):
        raise APIError(400, f"{key}: lora entries must be numbered from 0 without gaps",
                       "lora", "invalid_value")
    if i == len(entries):
        entries.append({})
    entries[i][m.group(2)] = _number(value) if m.group(2) == "scale" else value


def _open(data: bytes, field: str, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as exc:
        raise APIError(400, f"{field}: not a PNG, JPEG or WebP image", field,
                       "invalid_image") from exc
    except Image.DecompressionBombError as exc:
        raise APIError(400, f"{field}: too many pixels", field, "image_too_large") from exc
    if image.format not in FORMATS:
        raise APIError(400, f"{field}: {image.format} images are not taken; use PNG, JPEG "
                       "or WebP", field, "invalid_image")
    w, h = image.size
    if w * h > max_pixels:
        raise APIError(400, f"{field}: {w}x{h} is more than {max_pixels} pixels "
                       "(setting max_image_pixels)", field, "image_too_large")
    return image


def _square(image: Image.Image, size: tuple[int, int], resample: Any) -> Image.Image:
    return ImageOps.fit(image, size, method=resample, centering=(0.5, 0.5))


def read_image(data: bytes, size: tuple[int, int], max_pixels: int,
               field: str = "image") -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 (H, W, 3) at `size` (W, H), and the upload's own (oriented) size."""
    image = _open(data, field, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
        original = image.size
        rgb = image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise APIError(400, f"{field}: the image could not be decoded", field,
                       "invalid_image") from exc
    return np.array(_square(rgb, size, Image.Resampling.LANCZOS)), original


def read_mask(data: bytes, size: tuple[int, int], image_size: tuple[int, int],
              max_pixels: int) -> np.ndarray:
    """bool (H, W) at `size`: True where the image may change."""
    image = _open(data, "mask", max_pixels)
    image = ImageOps.exif_transpose(image)
    if image.size != image_size:
        raise APIError(400, f"mask is {image.size[0]}x{image.size[1]}, the image "
                       f"{image_size[0]}x{image_size[1]}: they must be the same size",
                       "mask", "invalid_value")
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        raise APIError(400, "mask must have an alpha channel: its fully transparent "
                       "pixels mark what may change", "mask", "invalid_value")
    alpha = image.convert("RGBA").getchannel("A")
    editable = alpha.point(lambda a: 255 if a == 0 else 0)
    fitted = _square(editable, size, Image.Resampling.BOX)  # any editable pixel under it
    return np.asarray(fitted) > 0
