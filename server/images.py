"""Image encoding for responses (runs off the core loop, in a worker thread)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: np.ndarray, fmt: str = "png", compression: int | None = None,
                 upscale: int = 1) -> bytes:
    pil = Image.fromarray(image)
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    buf = io.BytesIO()
    quality = 95 if compression is None else int(compression)
    if fmt == "png":
        pil.save(buf, format="PNG")
    elif fmt == "jpeg":
        pil.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        pil.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unsupported output_format {fmt!r}")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
