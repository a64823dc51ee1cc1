"""Serve a local diffusers pipeline folder inside the step-level scheduler.

The pipeline's modules and stateless helpers (encode_prompt, the VAE, the image
processor) are reused as they are; its `__call__` loop is not: that loop runs
one trajectory. Each request image instead gets its own copy of the folder's
scheduler (diffusers schedulers keep one trajectory's position per instance),
and every scheduler iteration runs ONE batched denoiser forward over requests
at different steps, with classifier-free guidance rows inside the same batch.

Families: SD 1.x / 2.x / SD-Turbo (UNet; epsilon or v-prediction) today.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepserve.models.caches.config import CacheConfig

from .base import EngineInfo

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PromptEmbeds:
    """Encoded prompts (B, L, D); what the scheduler slices per request."""

    hidden: torch.Tensor

    def select(self, index: list[int]) -> PromptEmbeds:
        return PromptEmbeds(self.hidden[index])

    def __len__(self) -> int:
        return self.hidden.shape[0]


@dataclass(frozen=True)
class DiffusersState:
    """One request image: latents plus its own scheduler instance."""

    x: torch.Tensor  # (C, h, w) latents
    scheduler: Any = field(repr=False)
    timesteps: tuple[float, ...]
    cond: PromptEmbeds
    uncond: PromptEmbeds
    guidance: float
    step: int = 0
    x0: torch.Tensor | None = field(default=None, repr=False)
    cache: CacheConfig | None = None
    skipped_blocks: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    @property
    def t(self) -> float:
        return self.timesteps[self.step]


class DiffusersEngine:
    name = "diffusers"

    def __init__(self, model: str, path: Path | str, precision: str = "fp32",
                 device: str = "cpu", default_steps: int = 4,
                 guidance: float | None = None, **_: Any) -> None:
        from diffusers import DiffusionPipeline

        if precision not in _DTYPES:
            raise ValueError(f"diffusers models support precision {sorted(_DTYPES)}, "
                             f"not {precision!r}")
        self.device, self.dtype = torch.device(device), _DTYPES[precision]
        # local folder only, safetensors only: nothing is downloaded or unpickled
        self.pipe = DiffusionPipeline.from_pretrained(str(path), use_safetensors=True,
                                                      local_files_only=True,
                                                      low_cpu_mem_usage=False,
                                                      torch_dtype=self.dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.family = family_of(self.pipe)
        self.unet = self.pipe.unet.eval()
        self.vae_scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        size = self.unet.config.sample_size * self.vae_scale
        self.latent_shape = (self.unet.config.in_channels, size // self.vae_scale,
                             size // self.vae_scale)
        self.build_seconds = 0.0
        self.info = EngineInfo(engine="torch", model=model, precision=precision,
                               device=str(self.device), image_shape=(3, size, size),
                               time_shift=1.0, default_steps=default_steps,
                               default_guidance=7.5 if guidance is None else guidance)

    # -- text -----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> PromptEmbeds:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return PromptEmbeds(embeds)

    # -- the sampling contract ------------------------------------------------------------
    def init_state(self, seed: int, steps: int, cond: PromptEmbeds, uncond: PromptEmbeds, *,
                   guidance: float, sampler: str = "euler",
                   cache: CacheConfig | None = None) -> DiffusersState:
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(steps, device="cpu")
        noise = torch.randn((1, *self.latent_shape),
                            generator=torch.Generator().manual_seed(seed))
        x = (noise * scheduler.init_noise_sigma)[0]
        return DiffusersState(x, scheduler, tuple(float(t) for t in scheduler.timesteps),
                              cond, uncond, guidance, cache=cache)

    @staticmethod
    def needs_forward(state: DiffusersState) -> bool:
        return True

    @torch.inference_mode()
    def step_batch(self, states: Sequence[DiffusersState]) -> list[DiffusersState]:
        guided = [i for i, s in enumerate(states) if s.guidance > 1.0]
        scaled = [s.scheduler.scale_model_input(s.x[None], s.scheduler.timesteps[s.step])
                  for s in states]
        x = torch.cat(scaled + [scaled[i] for i in guided])
        t = torch.tensor([s.t for s in states] + [states[i].t for i in guided])
        hidden = torch.cat([s.cond.hidden for s in states]
                           + [states[i].uncond.hidden for i in guided])
        eps = self.unet(x.to(self.device, self.dtype), t.to(self.device),
                        encoder_hidden_states=hidden.to(self.device, self.dtype),
                        return_dict=False)[0].float().cpu()
        out = []
        for k, s in enumerate(states):
            e = eps[k:k + 1]
            if k in guided:
                u = eps[len(states) + guided.index(k)][None]
                e = u + s.guidance * (e - u)
            res = s.scheduler.step(e, s.scheduler.timesteps[s.step], s.x[None])
            x0 = getattr(res, "pred_original_sample", None)
            out.append(replace(s, x=res.prev_sample[0], step=s.step + 1,
                               x0=None if x0 is None else x0[0]))
        return out

    # -- images ---------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, x: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        images = vae.decode(x.to(self.device, vae.dtype) / vae.config.scaling_factor,
                            return_dict=False)[0]
        images = self.pipe.image_processor.postprocess(images.float(), output_type="np")
        return (images * 255).round().astype(np.uint8)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        text = self.encode(["warm-up"])
        for b in batch_sizes:
            states = [self.init_state(i, 2, text, text, guidance=1.0) for i in range(b)]
            self.step_batch(states)


def family_of(pipe: Any) -> str:
    name = type(pipe).__name__
    if name in ("StableDiffusionPipeline",):
        return "sd"
    raise ValueError(f"{name} is not supported yet; supported: StableDiffusionPipeline")
