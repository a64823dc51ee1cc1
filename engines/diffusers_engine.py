"""Serve a local diffusers pipeline folder inside the step-level scheduler.

The pipeline's modules and stateless helpers (encode_prompt, latent packing, the
VAE, the image processor) are reused as they are; its `__call__` loop is not:
that loop runs one trajectory. Each request image instead gets its own copy of
the folder's scheduler (diffusers schedulers keep one trajectory's position per
instance) and its own generator, and every iteration runs ONE batched denoiser
forward over requests at different steps, with classifier-free guidance rows
inside the same batch. Family specifics live in models/families/adapters.py:
SD 1.x/2.x/Turbo, SDXL/Turbo, LCM, PixArt-alpha/-Sigma, SD3, FLUX.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepserve.models.caches import ab_cache
from stepserve.models.caches.config import CacheConfig
from stepserve.models.families.adapters import PromptEmbeds, family_of

from .base import EngineInfo

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# sampler name -> diffusers scheduler class (built from the folder's scheduler config)
SAMPLERS = {"euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
            "dpm++2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
            "lcm": "LCMScheduler", "tcd": "TCDScheduler",
            "flow-euler": "FlowMatchEulerDiscreteScheduler"}


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
    cache_state: ab_cache.ABState | None = field(default=None, repr=False)
    deep: tuple[torch.Tensor | None, torch.Tensor | None] = field(default=(None, None),
                                                                 repr=False)  # DeepCache
    skipped_blocks: float = 0.0
    generator: torch.Generator | None = field(default=None, repr=False)

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

    def __init__(self, model: str, path: Path | str | None = None, precision: str = "fp32",
                 device: str = "cpu", default_steps: int = 4, guidance: float | None = None,
                 image_size: int | None = None, pipe: Any = None, **_: Any) -> None:
        from diffusers import DiffusionPipeline

        if precision not in _DTYPES:
            raise ValueError(f"diffusers models support precision {sorted(_DTYPES)}, "
                             f"not {precision!r}")
        self.device, self.dtype = torch.device(device), _DTYPES[precision]
        if pipe is None:
            # local folder only, safetensors only: nothing is downloaded or unpickled
            pipe = DiffusionPipeline.from_pretrained(str(path), use_safetensors=True,
                                                     local_files_only=True,
                                                     low_cpu_mem_usage=False,
                                                     torch_dtype=self.dtype)
        self.pipe = pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.family = family_of(self.pipe)
        self.family.denoiser.eval()
        self.size = image_size or self.family.default_size()
        self.vae_scale = self.family.vae_scale
        self.taesd = load_taesd(Path(path), self.device, self.dtype) if path else None
        self.latent_rgb = latent_rgb_map(self.family.latent_shape(self.size)[0])
        self.build_seconds = 0.0
        self.samplers = ("default", *SAMPLERS)
        self.default_sampler = "default"
        self.info = EngineInfo(engine="torch", model=model, precision=precision,
                               device=str(self.device), image_shape=(3, self.size, self.size),
                               time_shift=1.0, default_steps=default_steps,
                               default_guidance=7.5 if guidance is None else guidance)

    @classmethod
    def from_pipeline(cls, model: str, pipe: Any, **kwargs: Any) -> DiffusersEngine:
        """Serve a pipeline object built in memory (benchmarks with random weights)."""
        dtype = next(pipe.components[k] for k in ("unet", "transformer")
                     if pipe.components.get(k) is not None).dtype
        precision = {v: k for k, v in _DTYPES.items()}[dtype]
        device = str(pipe.device)
        return cls(model, None, precision=precision, device=device, pipe=pipe, **kwargs)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> PromptEmbeds:
        return self.family.encode(list(prompts), self.device)

    # -- the sampling contract ------------------------------------------------------------
    def scheduler_for(self, sampler: str) -> Any:
        """A fresh scheduler of the named kind, configured like the folder's own."""
        if sampler == "default":
            return copy.deepcopy(self.pipe.scheduler)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is not one of {', '.join(self.samplers)}")
        import diffusers

        return getattr(diffusers, SAMPLERS[sampler]).from_config(self.pipe.scheduler.config)

    def ays_timesteps(self) -> list[int] | None:
        """The family's Align Your Steps schedule (10 steps), if it has one."""
        if self.family.ays_name is None:
            return None
        from diffusers.schedulers import AysSchedules

        return [int(t) for t in AysSchedules[self.family.ays_name]]

    def init_state(self, seed: int, steps: int, cond: PromptEmbeds, uncond: PromptEmbeds, *,
                   guidance: float, sampler: str = "default",
                   cache: CacheConfig | None = None,
                   schedule: dict[str, Any] | None = None) -> DiffusersState:
        scheduler = self.scheduler_for(sampler)
        if schedule:  # custom timesteps or sigmas (Align Your Steps and the like)
            (kind, values), = schedule.items()
            values = [int(v) for v in values] if kind == "timesteps" else list(values)
            scheduler.set_timesteps(device="cpu", **{kind: values})
        else:
            self.family.set_timesteps(scheduler, steps, self.size)
        # one generator per request image, consumed as the pipeline consumes its own:
        # first the initial noise, then any noise the sampler injects (LCM, ancestral)
        generator = torch.Generator().manual_seed(seed)
        noise = self.family.initial_noise(self.size, generator)
        x = (noise * getattr(scheduler, "init_noise_sigma", 1.0))[0]
        cache = cache if cache is not None and cache.enabled else None
        ab = cache is not None and cache.policy == "ab-cache"
        return DiffusersState(x, scheduler, tuple(float(t) for t in scheduler.timesteps),
                              cond, uncond, guidance, cache=cache, generator=generator,
                              cache_state=ab_cache.ABState() if ab else None)

    @staticmethod
    def needs_forward(state: DiffusersState) -> bool:
        """False when AB-Cache predicts this step's (guided) model output instead."""
        if state.cache is None or state.cache_state is None:
            return True
        return ab_cache.must_compute(state.cache, state.cache_state, state.step, state.steps,
                                     state.t)

    def _model_outputs(self, states: Sequence[DiffusersState]
                       ) -> tuple[list[torch.Tensor], list[DiffusersState]]:
        """ONE denoiser forward for these states: their (guided) outputs (1, ...), and the
        states with their DeepCache features updated."""
        if not states:
            return [], []
        family = self.family
        # CFG rows, unless the model takes guidance as an input (LCM, FLUX)
        guided = ([] if family.guidance_embedded
                  else [i for i, s in enumerate(states) if s.guidance > 1.0])
        scaled = [_scale(s) for s in states]
        x = torch.cat(scaled + [scaled[i] for i in guided])
        rows = list(states) + [states[i] for i in guided]
        t = torch.stack([s.scheduler.timesteps[s.step] for s in rows]).float()
        cond = PromptEmbeds.cat([s.cond for s in states] + [states[i].uncond for i in guided])
        g = torch.tensor([s.guidance for s in rows])
        x, t = x.to(self.device, self.dtype), t.to(self.device)
        states = list(states)
        if any(s.cache is not None and s.cache.policy == "deepcache" for s in states):
            out_all, states = self._deepcache(states, guided, x, t, cond, g)
        else:
            out_all = family.denoise(x, t, cond, g)
        out_all = out_all.float().cpu()
        outputs = []
        for k, s in enumerate(states):
            e = out_all[k:k + 1]
            if k in guided:
                u = out_all[len(states) + guided.index(k)][None]
                e = u + s.guidance * (e - u)
            outputs.append(e.clone())
        return outputs, states

    def _deepcache(self, states: list[DiffusersState], guided: list[int], x: torch.Tensor,
                   t: torch.Tensor, cond: PromptEmbeds, g: torch.Tensor
                   ) -> tuple[torch.Tensor, list[DiffusersState]]:
        """The forward with DeepCache rows: reuse deep features where the policy allows."""
        from stepserve.models.caches.deepcache import should_reuse

        rows = [(s, 0) for s in states] + [(states[i], 1) for i in guided]
        feats = [s.deep[k] for s, k in rows]
        reuse = torch.tensor([s.cache is not None and s.cache.policy == "deepcache"
                              and should_reuse(s.step, s.steps, s.cache.interval,
                                               s.cache.warmup, f is not None)
                              for (s, _), f in zip(rows, feats)])
        like = next((f for f in feats if f is not None), None)
        cached = None
        if like is not None:
            cached = torch.stack([f if f is not None else torch.zeros_like(like)
                                  for f in feats]).to(x)
        out, features = self.family.denoise_deep(x, t, cond, g, reuse, cached)
        unet = self.family.denoiser
        deep_blocks = len(unet.down_blocks) + len(unet.up_blocks) - 1  # + mid - 2 shallow
        new = []
        for i, s in enumerate(states):
            if s.cache is None or s.cache.policy != "deepcache":
                new.append(s)
                continue
            j = len(states) + guided.index(i) if i in guided else None
            deep = (features[i].detach().clone(),
                    features[j].detach().clone() if j is not None else s.deep[1])
            reused = int(reuse[i]) + (int(reuse[j]) if j is not None else 0)
            new.append(replace(s, deep=deep,
                               skipped_blocks=s.skipped_blocks + reused * deep_blocks))
        return out, new

    @torch.inference_mode()
    def step_batch(self, states: Sequence[DiffusersState]) -> list[DiffusersState]:
        """At most ONE forward; states whose AB-Cache skips this step take no row in it."""
        family = self.family
        need = [i for i, s in enumerate(states) if self.needs_forward(s)]
        outputs, updated = self._model_outputs([states[i] for i in need])
        computed = dict(zip(need, outputs))
        states = list(states)
        for i, s in zip(need, updated):
            states[i] = s
        out = []
        for k, s in enumerate(states):
            if k in computed:
                e = computed[k]
                if s.cache_state is not None:
                    s = replace(s, cache_state=ab_cache.record(s.cache_state, s.t, e,
                                                               s.cache.order))
            else:
                e = ab_cache.predict(s.cache_state, s.t, s.cache.order)
                s = replace(s, cache_state=ab_cache.skipped(s.cache_state))
            sigma = (float(s.scheduler.sigmas[s.step]) if family.flow else 0.0)
            extra = {"generator": s.generator} if _takes_generator(type(s.scheduler)) else {}
            res = s.scheduler.step(e, s.scheduler.timesteps[s.step], s.x[None], **extra)
            x0 = getattr(res, "pred_original_sample", None)
            if x0 is None:
                x0 = getattr(res, "denoised", None)
            if x0 is None and family.flow:
                x0 = s.x[None] - sigma * e  # x_t = (1 - s) x0 + s noise, v = noise - x0
            out.append(replace(s, x=res.prev_sample[0], step=s.step + 1,
                               x0=None if x0 is None else x0[0]))
        return out

    # -- images ---------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, x: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        x = self.family.decoder_latents(x, self.size).to(self.device, vae.dtype)
        cfg = vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            x = (x * torch.tensor(std).view(shape).to(x) / cfg.scaling_factor
                 + torch.tensor(mean).view(shape).to(x))
        else:
            x = x / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        images = vae.decode(x, return_dict=False)[0]
        images = self.pipe.image_processor.postprocess(images.float(), output_type="np")
        return (images * 255).round().astype(np.uint8)

    @torch.inference_mode()
    def preview(self, x0: torch.Tensor) -> np.ndarray:
        """A cheap preview of predicted clean latents: the folder's TAESD (AutoencoderTiny)
        when it ships one, else a linear latent-to-RGB map."""
        x0 = self.family.decoder_latents(x0, self.size)
        if self.taesd is not None:
            images = self.taesd.decode(x0.to(self.device, self.taesd.dtype),
                                       return_dict=False)[0]
        else:
            rgb = torch.einsum("nchw,cr->nrhw", x0.float(), self.latent_rgb)
            images = torch.nn.functional.interpolate(rgb, size=(self.size, self.size),
                                                     mode="nearest")
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        text = self.encode(["warm-up"])
        for b in batch_sizes:
            states = [self.init_state(i, 2, text, text, guidance=1.0) for i in range(b)]
            self.step_batch(states)


@functools.cache
def _takes_generator(scheduler_cls: type) -> bool:
    """Whether the sampler injects noise (LCM, ancestral): looked up once per class."""
    return "generator" in inspect.signature(scheduler_cls.step).parameters


def _scale(s: DiffusersState) -> torch.Tensor:
    """The scheduler's model-input scaling (Euler-type samplers; identity for flow)."""
    scale = getattr(s.scheduler, "scale_model_input", None)
    x = s.x[None]
    return x if scale is None else scale(x, s.scheduler.timesteps[s.step])


def load_taesd(folder: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """The folder's tiny preview decoder (subfolder `taesd`, AutoencoderTiny), if any."""
    if not (folder / "taesd" / "config.json").is_file():
        return None
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(str(folder / "taesd"), use_safetensors=True,
                                           torch_dtype=dtype).to(device).eval()


# Linear latent -> RGB approximations of the SD-family VAEs (4 latent channels), the
# well-known preview factors; other channel counts get a grey (channel-mean) preview.
SD_LATENT_RGB = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                 [-0.184, -0.271, -0.473]]


def latent_rgb_map(channels: int) -> torch.Tensor:
    if channels == 4:
        return torch.tensor(SD_LATENT_RGB)
    return torch.full((channels, 3), 1.0 / channels)
