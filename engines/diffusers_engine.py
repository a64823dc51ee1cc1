"""Serve a local diffusers pipeline folder inside the step-level scheduler.

The pipeline's modules and stateless helpers (encode_prompt, latent packing, the
VAE, the image processor) are reused as they are; its `__call__` loop is not:
that loop runs one trajectory. Each request image instead gets its own copy of
the folder's scheduler (diffusers schedulers keep one trajectory's position per
instance) and its own generator, and every iteration runs ONE batched denoiser
forward over requests at different steps, with classifier-free guidance rows
inside the same batch (the one batched step: models/sampling/batch.py, with
models/families/sampler.py). Family specifics live in models/families/adapters.py:
SD 1.x/2.x/Turbo, SDXL/Turbo, LCM, PixArt-alpha/-Sigma, SD3, FLUX.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepserve.models.caches.config import CacheConfig
from stepserve.models.families.adapters import PromptEmbeds, SDInpaintFamily, family_of
from stepserve.models.families.sampler import DiffusersState, DiffusersStepModel
from stepserve.models.lora.library import LoraLibrary, LoraTarget
from stepserve.models.sampling import batch
from stepserve.models.sampling.edit import Edit, Source

from .base import EngineInfo, adapters
from .capabilities import Capabilities

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# sampler name -> diffusers scheduler class (built from the folder's scheduler config)
SAMPLERS = {"euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
            "dpm++2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
            "lcm": "LCMScheduler", "tcd": "TCDScheduler",
            "flow-euler": "FlowMatchEulerDiscreteScheduler"}


class DiffusersEngine:
    name = "diffusers"

    def __init__(self, model: str, path: Path | str | None = None, precision: str = "fp32",
                 device: str = "cpu", guidance: float | None = None,
                 image_size: int | None = None, pipe: Any = None) -> None:
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
        self.loras: LoraLibrary | None = None
        self.lora_fallback_rows = 0  # its own torch forward applies adapters
        self.step_model = DiffusersStepModel(self.family, self.device, self.dtype)
        self.info = EngineInfo(engine="torch", model=model, precision=precision,
                               device=str(self.device), image_shape=(3, self.size, self.size),
                               time_shift=1.0,
                               default_guidance=7.5 if guidance is None else guidance)
        self.capabilities = self._capabilities()

    @classmethod
    def from_pipeline(cls, model: str, pipe: Any, **kwargs: Any) -> DiffusersEngine:
        """Serve a pipeline object built in memory (benchmarks with random weights)."""
        dtype = next(pipe.components[k] for k in ("unet", "transformer")
                     if pipe.components.get(k) is not None).dtype
        precision = {v: k for k, v in _DTYPES.items()}[dtype]
        device = str(pipe.device)
        return cls(model, None, precision=precision, device=device, pipe=pipe, **kwargs)

    def _capabilities(self) -> Capabilities:
        samplers = ("default", *SAMPLERS)
        kinds = {}
        for name in samplers:  # which custom schedules each scheduler's set_timesteps takes
            params = inspect.signature(self.scheduler_for(name).set_timesteps).parameters
            kinds[name] = tuple(k for k in ("timesteps", "sigmas") if k in params)
        ays = self.ays_timesteps()
        return Capabilities(samplers=samplers, default_sampler="default",
                            features=("unet",) if self.family.unet else (),
                            ays=tuple(ays) if ays else None, schedule_kinds=kinds,
                            edits=self.family.takes_edits, lora=True)

    @property
    def lora_target(self) -> LoraTarget:
        return LoraTarget(self.info.model, self.family.denoiser, type(self.pipe))

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> PromptEmbeds:
        return self.family.encode(list(prompts), self.device)

    def text_cache_stats(self) -> tuple[int, int]:
        return 0, 0  # prompts are encoded by the pipeline's encoders, uncached

    # -- the sampling contract ------------------------------------------------------------
    def scheduler_for(self, sampler: str) -> Any:
        """A fresh scheduler of the named kind, configured like the folder's own."""
        if sampler == "default":
            return copy.deepcopy(self.pipe.scheduler)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is not one of default, "
                             f"{', '.join(SAMPLERS)}")
        cls = getattr(importlib.import_module("diffusers"), SAMPLERS[sampler])  # by name
        return cls.from_config(self.pipe.scheduler.config)

    def ays_timesteps(self) -> list[int] | None:
        """The family's Align Your Steps schedule (10 steps), if it has one."""
        if self.family.ays_name is None:
            return None
        from diffusers.schedulers import AysSchedules

        schedule: Any = AysSchedules[self.family.ays_name]
        return [int(t) for t in schedule]

    def init_state(self, seed: int, steps: int, cond: PromptEmbeds, uncond: PromptEmbeds, *,
                   guidance: float, sampler: str = "default",
                   cache: CacheConfig | None = None,
                   schedule: dict[str, Sequence[float]] | None = None,
                   edit: Edit | None = None,
                   lora: Sequence[tuple[str, float]] = ()) -> DiffusersState:
        adapted = adapters(self, lora)
        if edit is not None and not self.family.takes_edits:
            raise ValueError(f"{self.info.model!r} ({type(self.pipe).__name__}) does not "
                             "take edits yet")
        scheduler = self.scheduler_for(sampler)
        if schedule:  # custom timesteps or sigmas (Align Your Steps and the like)
            kind, given = next(iter(schedule.items()))
            values = [int(v) for v in given] if kind == "timesteps" else list(given)
            scheduler.set_timesteps(device="cpu", **{kind: values})
        else:
            self.family.set_timesteps(scheduler, steps, self.size)
        # one generator per request image, consumed as the pipeline consumes its own:
        # (an edit's VAE sample,) the initial noise, then any noise the sampler injects
        generator = torch.Generator().manual_seed(seed)
        cache = cache if cache is not None and cache.enabled else None
        cache_state, row_caches = batch.cache_states(cache)
        timesteps = tuple(float(t) for t in scheduler.timesteps)
        if self.family.inpainting and (edit is None or edit.mask is None):
            raise ValueError(f"{self.info.model!r} is an inpainting model: send an image and "
                             "a mask to /v1/images/edits (with several images, the mask "
                             "is the first's: send them one per request)")
        if edit is not None and self.family.inpainting:
            x, step, source = self._inpaint_start(scheduler, edit, generator)
            return DiffusersState(x, scheduler, timesteps, cond, uncond, guidance, step=step,
                                  cache=cache, generator=generator, source=source,
                                  cache_state=cache_state, row_caches=row_caches,
                                  lora=adapted)
        if edit is not None:
            x, step, source = self._edit_start(scheduler, steps, edit, generator)
            return DiffusersState(x, scheduler, timesteps, cond, uncond, guidance, step=step,
                                  cache=cache, generator=generator, source=source,
                                  cache_state=cache_state, row_caches=row_caches,
                                  lora=adapted)
        noise = self.family.initial_noise(self.size, generator)
        x = (noise * init_noise_sigma(scheduler))[0]
        return DiffusersState(x, scheduler, timesteps, cond, uncond, guidance, cache=cache,
                              generator=generator, cache_state=cache_state,
                              row_caches=row_caches, lora=adapted)

    def _inpaint_start(self, scheduler: Any, edit: Edit, generator: torch.Generator
                       ) -> tuple[torch.Tensor, int, Source]:
        """As StableDiffusionInpaintPipeline starts: (at strength < 1 the source's
        latents,) the noise, then the masked image's latents, from one generator."""
        first = begin_at(scheduler, self.family.start_step(len(scheduler.timesteps) //
                                                           scheduler.order, edit.strength))
        assert edit.mask is not None
        full = edit.strength >= 1.0
        x0 = None if full else self.family.encode_image(edit.image, generator)
        noise = self.family.initial_noise(self.size, generator)[0]
        if x0 is None:
            x = noise * init_noise_sigma(scheduler)
        else:
            x = scheduler.add_noise(x0[None], noise[None], scheduler.timesteps[first:first + 1])[0]
        assert isinstance(self.family, SDInpaintFamily)
        condition = self.family.inpaint_condition(edit.image, edit.mask, generator)
        return x, first, Source(noise if x0 is None else x0, noise, None, condition)

    def _edit_start(self, scheduler: Any, steps: int, edit: Edit,
                    generator: torch.Generator) -> tuple[torch.Tensor, int, Source]:
        """img2img as diffusers' img2img pipelines start it: the source's latents noised
        to the first timestep of the schedule's last int(steps * strength) steps."""
        family = self.family
        first = begin_at(scheduler, family.start_step(len(scheduler.timesteps) //
                                                      scheduler.order, edit.strength))
        x0 = family.encode_image(edit.image, generator)
        noise = family.initial_noise(self.size, generator)[0]
        x = family.noised(scheduler, x0, noise, scheduler.timesteps[first:first + 1])
        mask = None if edit.mask is None else family.model_mask(edit.mask, self.size)
        return x, first, Source(x0, noise, mask)

    @staticmethod
    def needs_forward(state: DiffusersState) -> bool:
        return batch.needs_forward(state)

    @torch.inference_mode()
    def step_batch(self, states: Sequence[DiffusersState]) -> list[DiffusersState]:
        """At most ONE forward; states whose AB-Cache skips this step take no row in it."""
        return batch.step_batch(self.step_model, states)

    def picard_init(self, state: DiffusersState) -> Any:
        raise NotImplementedError("latency mode (ParaDiGMS) runs on the built-in model only")

    def picard_round(self, p: Any) -> Any:
        raise NotImplementedError("latency mode (ParaDiGMS) runs on the built-in model only")

    # -- images ---------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, x: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        x = self.family.decoder_latents(x, self.size).to(self.device, vae.dtype)
        cfg = vae.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")  # a config dict
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            x = (x * torch.tensor(std).view(shape).to(x) / cfg.scaling_factor
                 + torch.tensor(mean).view(shape).to(x))
        else:
            x = x / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
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
        edit = None
        if self.family.inpainting:  # it only edits: warm it up with an edit
            edit = Edit(np.zeros((self.size, self.size, 3), np.uint8), 1.0,
                        np.ones((self.size, self.size), bool))
        for b in batch_sizes:
            states = [self.init_state(i, 2, text, text, guidance=1.0, edit=edit)
                      for i in range(b)]
            self.step_batch(states)


def init_noise_sigma(scheduler: Any) -> float:
    # probed: diffusers' flow-matching schedulers have no init_noise_sigma (it is 1)
    return getattr(scheduler, "init_noise_sigma", 1.0)


def begin_at(scheduler: Any, start: int) -> int:
    """An edit's first timestep index, told to index-based schedulers (which alone have
    set_begin_index: probed) as diffusers' img2img pipelines tell them."""
    first = start * scheduler.order
    if hasattr(scheduler, "set_begin_index"):  # index-based schedulers only
        scheduler.set_begin_index(first)
    return first


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
