"""Image edits inside the batched step: img2img starts part-way down the schedule from a
noised source, and inpainting keeps the unmasked region on the source's trajectory.

`Edit` is what a request carries (pixels); `Source` is what a request image's
sampler state carries (model space: the clean source, its noise and the mask). The
model kinds supply the noising (flow: x_t = (1 - t) x0 + t noise; diffusers: the
scheduler's own `add_noise`), the batched step (batch.py) applies it after every
advance, and the scheduler composites the final pixels outside the mask exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class Edit:
    """An edit request's source image (uint8 (H, W, 3) at the model's output size), how
    far down the schedule sampling starts (`strength` 1.0: from pure noise), and an
    optional mask (bool (H, W), True where the image may change).

    `more` holds further sources (`image[]` with several files): each is edited on its
    own, in order, with the same share of the request's images; the mask applies to
    the first source only, as OpenAI's edits endpoint applies it."""

    image: np.ndarray
    strength: float = 0.8
    mask: np.ndarray | None = None
    more: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        if self.image.dtype != np.uint8 or self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError("an edit's image is uint8 (H, W, 3)")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError("strength must be in (0, 1]")
        if self.mask is not None and self.mask.shape != self.image.shape[:2]:
            raise ValueError(f"mask is {self.mask.shape}, image {self.image.shape[:2]}")
        if any(m.shape != self.image.shape or m.dtype != np.uint8 for m in self.more):
            raise ValueError("every source of an edit is uint8 of the first one's shape")

    @property
    def sources(self) -> int:
        return 1 + len(self.more)

    def first_rows(self, n: int) -> int:
        """How many of a request's n images are edits of the first source."""
        return n // self.sources

    def row(self, k: int, n: int) -> Edit:
        """The one-source edit that image k of a request's n images runs."""
        i = k // self.first_rows(n)
        if i == 0:
            return self if not self.more else Edit(self.image, self.strength, self.mask)
        return Edit(self.more[i - 1], self.strength)

    def digest(self) -> str:
        """What an exact-result-cache key needs to know of the source."""
        h = hashlib.sha256(self.image.tobytes() + str(self.image.shape).encode())
        for more in self.more:
            h.update(b"|" + more.tobytes())
        if self.mask is not None:
            h.update(np.packbits(self.mask).tobytes())
        return f"{h.hexdigest()}:{self.strength!r}"


def start_step(steps: int, strength: float) -> int:
    """The first step an edit runs, as diffusers' img2img pipelines choose it: the last
    int(steps * strength) steps of a `steps`-step schedule (at least one)."""
    return steps - max(1, min(int(steps * strength), steps))


@dataclass(frozen=True)
class Source:
    """A request image's edit source in model space."""

    x0: torch.Tensor  # the clean source (the model's sample space)
    noise: torch.Tensor  # the noise it was started with
    mask: torch.Tensor | None = field(default=None)  # (1, h, w) 1 where it may change
    # a dedicated inpainting model's own input channels (mask, masked-image latents):
    # conditioning instead of blending (mask then stays None)
    condition: torch.Tensor | None = field(default=None)


def mask_tensor(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """bool (H, W) -> float (1, h, w): a model-space cell may change if any of its pixels
    may (a latent cell half-covered by the mask is edited, as diffusers does)."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    if tuple(m.shape[-2:]) != size:
        m = torch.nn.functional.adaptive_max_pool2d(m, size)
    return m[0]


def composite(images: np.ndarray, edit: Edit) -> np.ndarray:
    """Final pixels of mask-blended sampling: the source outside the mask, exactly (on
    the first source's images; the others have no mask)."""
    if edit.mask is None:
        return images
    first = edit.first_rows(images.shape[0])
    keep = ~edit.mask[None, :, :, None]
    return np.concatenate([np.where(keep, edit.image[None], images[:first]), images[first:]])
