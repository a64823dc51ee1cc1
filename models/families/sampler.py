"""Per-request diffusers sampling inside the one batched step (models/sampling/batch.py).

Each request image gets its own copy of the folder's scheduler (diffusers
schedulers keep one trajectory's position per instance) and its own generator,
consumed as the pipeline consumes its own. `DiffusersStepModel` supplies the
family's batched forward (with DeepCache rows for U-Nets) and the scheduler's step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..caches.config import CacheConfig
from ..caches.deepcache import DeepCacheConfig, DeepState
from ..lora.apply import Adapters
from ..sampling import batch
from ..sampling.batch import Row
from ..sampling.edit import Source
from .adapters import PromptEmbeds, SDFamily


@dataclass(frozen=True)
class DiffusersState:
    """One request image: model-space latents plus its own scheduler and generator."""

    x: torch.Tensor
    scheduler: Any = field(repr=False)
    timesteps: tuple[float, ...]
    cond: PromptEmbeds
    uncond: PromptEmbeds
    guidance: float
    step: int = 0
    x0: torch.Tensor | None = field(default=None, repr=False)
    cache: CacheConfig | None = None
    cache_state: Any = field(default=None, repr=False)
    row_caches: tuple[Any, Any] | None = field(default=None, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)
    source: Source | None = field(default=None, repr=False)  # an edit's source (latents)
    lora: Adapters | None = field(default=None, repr=False)  # LoRA adapters and scales

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    @property
    def t(self) -> float:
        return self.timesteps[self.step]

    @property
    def skipped_blocks(self) -> float:
        return batch.skipped_blocks(self)


_TAKES_GENERATOR: dict[type, bool] = {}


def _takes_generator(scheduler: Any) -> bool:
    """Whether the sampler injects noise (LCM, ancestral): looked up once per class."""
    cls = type(scheduler)
    if cls not in _TAKES_GENERATOR:
        _TAKES_GENERATOR[cls] = "generator" in inspect.signature(cls.step).parameters
    return _TAKES_GENERATOR[cls]


def _model_input(s: DiffusersState) -> torch.Tensor:
    """The scheduler's model-input scaling (Euler-type samplers)."""
    # probed: diffusers' flow-matching schedulers have none (their input is the sample)
    scale = getattr(s.scheduler, "scale_model_input", None)
    x = s.x[None]
    return x if scale is None else scale(x, s.scheduler.timesteps[s.step])


def _with_condition(s: DiffusersState, x: torch.Tensor) -> torch.Tensor:
    """A dedicated inpainting model's extra input channels, after the scaled latents."""
    src = s.source
    if src is None or src.condition is None:
        return x
    return torch.cat([x, src.condition[None].to(x)], 1)


@dataclass(frozen=True)
class DiffusersStepModel:
    family: SDFamily
    device: torch.device
    dtype: torch.dtype

    def cfg_rows(self, state: DiffusersState) -> bool:
        """CFG rows, unless the model takes guidance as an input (LCM, FLUX)."""
        return not self.family.guidance_embedded and state.guidance > 1.0

    def forward(self, rows: list[Row[DiffusersState]]) -> tuple[torch.Tensor, list[Any]]:
        x = torch.cat([_with_condition(r.state, _model_input(r.state)) for r in rows])
        t = torch.stack([r.state.scheduler.timesteps[r.state.step] for r in rows]).float()
        cond = PromptEmbeds.cat([r.text for r in rows])
        g = torch.tensor([r.state.guidance for r in rows])
        x, t = x.to(self.device, self.dtype), t.to(self.device)
        if any(r.state.row_caches is not None for r in rows):  # DeepCache rows (U-Nets)
            out, new = self._deepcache(rows, x, t, cond, g)
        else:
            out, new = self.family.denoise(x, t, cond, g), [None] * len(rows)
        return out.float().cpu(), new

    def _deepcache(self, rows: list[Row[DiffusersState]], x: torch.Tensor, t: torch.Tensor,
                   cond: PromptEmbeds, g: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        """The forward with DeepCache rows: reuse deep features where the policy allows."""
        caches: list[DeepState | None] = [r.cache for r in rows]
        reuse = torch.tensor([c is not None and isinstance(r.state.cache, DeepCacheConfig)
                              and r.state.cache.reuses(c, r.state.step, r.state.steps)
                              for r, c in zip(rows, caches)])
        feats = [c.features if c is not None else None for c in caches]
        like = next((f for f in feats if f is not None), None)
        cached = None
        if like is not None:
            cached = torch.stack([f if f is not None else torch.zeros_like(like)
                                  for f in feats]).to(x)
        out, features = self.family.denoise_deep(x, t, cond, g, reuse, cached)
        unet: Any = self.family.denoiser
        deep_blocks = len(unet.down_blocks) + len(unet.up_blocks) - 1  # + mid - 2 shallow
        new = [DeepState(features[k].detach().clone(),
                         c.skipped_blocks + int(reuse[k]) * deep_blocks)
               if c is not None else None for k, c in enumerate(caches)]
        return out, new

    def keep(self, s: DiffusersState) -> DiffusersState:
        """Inpainting with a plain checkpoint, as diffusers' inpainting pipelines do it:
        outside the (latent) mask, the source latents noised to the next timestep (the
        clean source after the last step)."""
        src = s.source
        assert src is not None and src.mask is not None
        orig = src.x0
        if not s.done:
            orig = self.family.noised(s.scheduler, src.x0, src.noise,
                                      s.scheduler.timesteps[s.step:s.step + 1])
        m = src.mask
        return replace(s, x=m * s.x + (1 - m) * orig)

    def advance(self, s: DiffusersState, out: torch.Tensor) -> DiffusersState:
        e = out[None]
        extra = {"generator": s.generator} if _takes_generator(s.scheduler) else {}
        res = s.scheduler.step(e, s.scheduler.timesteps[s.step], s.x[None], **extra)
        # diffusers outputs are dicts: samplers name their x0 estimate differently
        x0 = res.get("pred_original_sample")
        if x0 is None:
            x0 = res.get("denoised")
        if x0 is None and self.family.flow:  # x_t = (1 - s) x0 + s noise, v = noise - x0
            x0 = s.x[None] - float(s.scheduler.sigmas[s.step]) * e
        return replace(s, x=res.prev_sample[0], step=s.step + 1,
                       x0=None if x0 is None else x0[0])
