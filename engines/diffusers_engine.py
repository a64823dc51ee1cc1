"""Serve a local diffusers pipeline folder inside the step-level scheduler.

The pipeline's modules and stateless helpers (encode_prompt, the VAE, the image
processor) are reused as they are; its `__call__` loop is not: that loop runs
one trajectory. Each request image instead gets its own copy of the folder's
scheduler (diffusers schedulers keep one trajectory's position per instance),
and every scheduler iteration runs ONE batched denoiser forward over requests
at different steps, with classifier-free guidance rows inside the same batch.

Families: SD 1.x / 2.x / SD-Turbo (UNet; epsilon or v-prediction), SDXL /
SDXL-Turbo (two text encoders, pooled embeddings, added time ids), LCM (guidance
embedding) and PixArt-alpha / -Sigma (DiT over T5) today.
"""

from __future__ import annotations

import copy
import inspect
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
    """Encoded prompts, batch-first tensors by name (hidden states, pooled, time ids...);
    what the scheduler slices per request."""

    tensors: dict[str, torch.Tensor]

    def select(self, index: list[int]) -> PromptEmbeds:
        return PromptEmbeds({k: v[index] for k, v in self.tensors.items()})

    @staticmethod
    def cat(items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds({k: torch.cat([i.tensors[k] for i in items])
                             for k in items[0].tensors})

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]


class SDFamily:
    """SD 1.x / 2.x / SD-Turbo: one CLIP text encoder, UNet conditioned on its states."""

    guidance_embedded = False

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def encode(self, prompts: list[str], device: torch.device) -> PromptEmbeds:
        hidden, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        return PromptEmbeds({"hidden": hidden})

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def unet_kwargs(self, cond: PromptEmbeds, dtype: torch.dtype, device: torch.device
                    ) -> dict[str, Any]:
        return {"encoder_hidden_states": cond.tensors["hidden"].to(device, dtype)}

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds,
                extra: dict[str, Any]) -> torch.Tensor:
        """ONE forward of the family's denoiser over rows at different timesteps."""
        dtype, device = x.dtype, x.device
        return self.pipe.unet(x, t, **self.unet_kwargs(cond, dtype, device), **extra,
                              return_dict=False)[0]


class SDXLFamily(SDFamily):
    """SDXL / SDXL-Turbo: two text encoders, pooled embeddings and size/crop time ids."""

    def encode(self, prompts: list[str], device: torch.device) -> PromptEmbeds:
        pipe = self.pipe
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device=device,
                                                  do_classifier_free_guidance=False)
        if pipe.config.force_zeros_for_empty_prompt:  # the pipeline's unconditional input
            empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        size = pipe.default_sample_size * pipe.vae_scale_factor
        projection = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2
                      is not None else int(pooled.shape[-1]))
        time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size),
                                          dtype=hidden.dtype,
                                          text_encoder_projection_dim=projection)
        return PromptEmbeds({"hidden": hidden, "pooled": pooled,
                             "time_ids": time_ids.repeat(len(prompts), 1)})

    def unet_kwargs(self, cond: PromptEmbeds, dtype: torch.dtype, device: torch.device
                    ) -> dict[str, Any]:
        t = cond.tensors
        return {"encoder_hidden_states": t["hidden"].to(device, dtype),
                "added_cond_kwargs": {"text_embeds": t["pooled"].to(device, dtype),
                                      "time_ids": t["time_ids"].to(device, dtype)}}


class LCMFamily(SDFamily):
    """Latent consistency models: guidance enters as a w embedding, not as CFG rows."""

    guidance_embedded = True

    def guidance_embedding(self, guidance: torch.Tensor) -> torch.Tensor:
        # the pipeline's Imagen-style convention: w = guidance - 1
        return self.pipe.get_guidance_scale_embedding(
            guidance - 1, embedding_dim=self.pipe.unet.config.time_cond_proj_dim)


class PixArtFamily(SDFamily):
    """PixArt-alpha / -Sigma: a DiT (adaLN-single) over T5 states with their mask;
    a learned-sigma output keeps only its noise half."""

    max_sequence_length = 300

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def encode(self, prompts: list[str], device: torch.device) -> PromptEmbeds:
        hidden, mask, _, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=device, clean_caption=False,
            max_sequence_length=self.max_sequence_length)
        return PromptEmbeds({"hidden": hidden, "mask": mask})

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds,
                extra: dict[str, Any]) -> torch.Tensor:
        model = self.pipe.transformer
        out = model(x, encoder_hidden_states=cond.tensors["hidden"].to(x.device, x.dtype),
                    encoder_attention_mask=cond.tensors["mask"].to(x.device), timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                    return_dict=False)[0]
        if model.config.out_channels // 2 == x.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return out


class PixArtAlphaFamily(PixArtFamily):
    max_sequence_length = 120


FAMILIES = {"StableDiffusionPipeline": SDFamily, "StableDiffusionXLPipeline": SDXLFamily,
            "LatentConsistencyModelPipeline": LCMFamily, "PixArtSigmaPipeline": PixArtFamily,
            "PixArtAlphaPipeline": PixArtAlphaFamily}
# sampler name -> diffusers scheduler class (built from the folder's scheduler config)
SAMPLERS = {"euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
            "dpm++2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
            "lcm": "LCMScheduler", "tcd": "TCDScheduler"}


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
        self.family = family_of(self.pipe)(self.pipe)
        denoiser = self.family.denoiser.eval()
        self.vae_scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        size = denoiser.config.sample_size * self.vae_scale
        self.latent_shape = (denoiser.config.in_channels, size // self.vae_scale,
                             size // self.vae_scale)
        self.taesd = load_taesd(Path(path), self.device, self.dtype)
        self.latent_rgb = latent_rgb_map(denoiser.config.in_channels)
        self.build_seconds = 0.0
        self.samplers = ("default", *SAMPLERS)
        self.default_sampler = "default"
        self.info = EngineInfo(engine="torch", model=model, precision=precision,
                               device=str(self.device), image_shape=(3, size, size),
                               time_shift=1.0, default_steps=default_steps,
                               default_guidance=7.5 if guidance is None else guidance)

    # -- text -----------------------------------------------------------------------------
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

    def init_state(self, seed: int, steps: int, cond: PromptEmbeds, uncond: PromptEmbeds, *,
                   guidance: float, sampler: str = "default",
                   cache: CacheConfig | None = None) -> DiffusersState:
        scheduler = self.scheduler_for(sampler)
        scheduler.set_timesteps(steps, device="cpu")
        # one generator per request image, consumed as the pipeline consumes its own:
        # first the initial noise, then any noise the sampler injects (LCM, ancestral)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, *self.latent_shape), generator=generator)
        x = (noise * scheduler.init_noise_sigma)[0]
        return DiffusersState(x, scheduler, tuple(float(t) for t in scheduler.timesteps),
                              cond, uncond, guidance, cache=cache, generator=generator)

    @staticmethod
    def needs_forward(state: DiffusersState) -> bool:
        return True

    @torch.inference_mode()
    def step_batch(self, states: Sequence[DiffusersState]) -> list[DiffusersState]:
        # CFG rows, unless the model takes guidance as an input (LCM's w embedding)
        guided = ([] if self.family.guidance_embedded
                  else [i for i, s in enumerate(states) if s.guidance > 1.0])
        scaled = [s.scheduler.scale_model_input(s.x[None], s.scheduler.timesteps[s.step])
                  for s in states]
        x = torch.cat(scaled + [scaled[i] for i in guided])
        t = torch.tensor([s.t for s in states] + [states[i].t for i in guided])
        cond = PromptEmbeds.cat([s.cond for s in states] + [states[i].uncond for i in guided])
        extra = {}
        if self.family.guidance_embedded:
            extra["timestep_cond"] = self.family.guidance_embedding(
                torch.tensor([s.guidance for s in states])).to(self.device, self.dtype)
        eps = self.family.denoise(x.to(self.device, self.dtype), t.to(self.device), cond,
                                  extra).float().cpu()
        out = []
        for k, s in enumerate(states):
            e = eps[k:k + 1]
            if k in guided:
                u = eps[len(states) + guided.index(k)][None]
                e = u + s.guidance * (e - u)
            extra = ({"generator": s.generator} if "generator" in
                     inspect.signature(s.scheduler.step).parameters else {})
            res = s.scheduler.step(e, s.scheduler.timesteps[s.step], s.x[None], **extra)
            x0 = getattr(res, "pred_original_sample", None)
            if x0 is None:
                x0 = getattr(res, "denoised", None)
            out.append(replace(s, x=res.prev_sample[0], step=s.step + 1,
                               x0=None if x0 is None else x0[0]))
        return out

    # -- images ---------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, x: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        x = x.to(self.device, vae.dtype)
        mean, std = (getattr(vae.config, "latents_mean", None),
                     getattr(vae.config, "latents_std", None))
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            x = (x * torch.tensor(std).view(shape).to(x) / vae.config.scaling_factor
                 + torch.tensor(mean).view(shape).to(x))
        else:
            x = x / vae.config.scaling_factor
        images = vae.decode(x, return_dict=False)[0]
        images = self.pipe.image_processor.postprocess(images.float(), output_type="np")
        return (images * 255).round().astype(np.uint8)

    @torch.inference_mode()
    def preview(self, x0: torch.Tensor) -> np.ndarray:
        """A cheap preview of predicted clean latents: the folder's TAESD (AutoencoderTiny)
        when it ships one, else the family's linear latent-to-RGB map."""
        if self.taesd is not None:
            images = self.taesd.decode(x0.to(self.device, self.taesd.dtype),
                                       return_dict=False)[0]
        else:
            rgb = torch.einsum("nchw,cr->nrhw", x0.float(), self.latent_rgb)
            images = torch.nn.functional.interpolate(rgb, scale_factor=self.vae_scale,
                                                     mode="nearest")
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        text = self.encode(["warm-up"])
        for b in batch_sizes:
            states = [self.init_state(i, 2, text, text, guidance=1.0) for i in range(b)]
            self.step_batch(states)


def family_of(pipe: Any) -> type[SDFamily]:
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise ValueError(f"{name} is not supported yet; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


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
