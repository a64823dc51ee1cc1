"""Per-family pieces of a diffusers pipeline that the batched step needs: prompt
encoding, the initial noise, the timestep schedule, ONE denoiser call over rows at
different timesteps, and the latents the VAE decodes. Everything else (the
per-request scheduler, CFG rows, decoding) is shared in engines/diffusers_engine.py.

Each method mirrors what the pipeline's own `__call__` does for one trajectory,
reusing the pipeline's stateless helpers (encode_prompt, latent packing, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..sampling.edit import mask_tensor, start_step


@dataclass(frozen=True)
class PromptEmbeds:
    """Encoded prompts, batch-first tensors by name; what the scheduler slices per request."""

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
    """SD 1.x / 2.x / SD-Turbo: one CLIP text encoder, a UNet on its states."""

    inpainting = False  # a dedicated inpainting checkpoint (SDInpaintFamily)
    guidance_embedded = False  # True: guidance is a model input, no CFG rows
    flow = False  # flow-matching velocity models (x0 = x - sigma * v)
    denoiser_name = "unet"  # the pipeline component that denoises

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.components[self.denoiser_name]

    @property
    def unet(self) -> bool:
        """DeepCache applies (a U-Net with down / up blocks)."""
        return self.denoiser_name == "unet"

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def default_size(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        return (self.denoiser.config.in_channels, size // self.vae_scale,
                size // self.vae_scale)

    def initial_noise(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """(1, ...) model-space noise, drawn from `generator` as the pipeline draws it."""
        return torch.randn((1, *self.latent_shape(size)), generator=generator)

    def set_timesteps(self, scheduler: Any, steps: int, size: int) -> None:
        scheduler.set_timesteps(steps, device="cpu")

    ays_name = "StableDiffusionTimesteps"  # Align Your Steps schedule for this family

    def encode(self, prompts: list[str], device: torch.device) -> PromptEmbeds:
        hidden, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        return PromptEmbeds({"hidden": hidden})

    def unet_inputs(self, x: torch.Tensor, cond: PromptEmbeds,
                    guidance: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": self._t(cond, "hidden", x)}

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds,
                guidance: torch.Tensor) -> torch.Tensor:
        """ONE forward over rows at different timesteps (guidance used when embedded)."""
        return self.pipe.unet(x, t, **self.unet_inputs(x, cond, guidance),
                              return_dict=False)[0]

    def denoise_deep(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds,
                     guidance: torch.Tensor, reuse: torch.Tensor,
                     cached: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The same forward with DeepCache: (output, deep features per row)."""
        from ..caches.deepcache import deepcache_forward

        return deepcache_forward(self.pipe.unet, x, t, reuse=reuse, cached=cached,
                                 **self.unet_inputs(x, cond, guidance))

    def decoder_latents(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """Model-space latents (N, ...) -> VAE-space (N, C, h, w)."""
        return x

    takes_edits = True  # img2img / inpainting from VAE latents

    def start_step(self, steps: int, strength: float) -> int:
        """The first step an edit runs, as this family's img2img pipeline chooses it:
        the last int(steps * strength) steps (at least one)."""
        return start_step(steps, strength)

    def noised(self, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
        """The source at timestep t (one sample, no batch dimension)."""
        if self.flow:  # flow-matching schedulers interpolate: x_t = t x1 + (1 - t) x0
            return scheduler.scale_noise(x0[None], t, noise[None])[0]
        return scheduler.add_noise(x0[None], noise[None], t)[0]

    def model_mask(self, editable: np.ndarray, size: int) -> torch.Tensor:
        """A pixel mask (True: may change) in model space, broadcastable to the latents."""
        _, h, w = self.latent_shape(size)
        return mask_tensor(editable, (h, w))

    @torch.inference_mode()
    def encode_image(self, image: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """A source image (uint8 (H, W, 3) at the output size) -> model-space latents
        (C, h, w), drawn from the VAE's posterior with `generator` exactly as diffusers'
        img2img pipelines draw it (before the noise)."""
        from PIL import Image

        pipe = self.pipe
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess(Image.fromarray(image))
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        cfg = vae.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")  # a config dict
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            z = ((z - torch.tensor(mean).view(shape).to(z)) * cfg.scaling_factor
                 / torch.tensor(std).view(shape).to(z))
        else:
            z = (z - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor
        return self.to_model_space(z)[0].float().cpu()

    def to_model_space(self, z: torch.Tensor) -> torch.Tensor:
        """VAE-space latents (N, C, h, w) -> the denoiser's sample space."""
        return z

    @staticmethod
    def _t(cond: PromptEmbeds, name: str, like: torch.Tensor) -> torch.Tensor:
        return cond.tensors[name].to(like.device, like.dtype)


class SDXLFamily(SDFamily):
    """SDXL / SDXL-Turbo: two text encoders, pooled embeddings and size/crop time ids."""

    ays_name = "StableDiffusionXLTimesteps"

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

    def unet_inputs(self, x: torch.Tensor, cond: PromptEmbeds,
                    guidance: torch.Tensor) -> dict[str, Any]:
        added = {"text_embeds": self._t(cond, "pooled", x),
                 "time_ids": self._t(cond, "time_ids", x)}
        return {"encoder_hidden_states": self._t(cond, "hidden", x), "added_cond_kwargs": added}


class SDInpaintFamily(SDFamily):
    """A dedicated inpainting checkpoint (SD inpaint: a U-Net with 9 input channels):
    the mask and the masked image's latents are extra input channels, as in diffusers'
    StableDiffusionInpaintPipeline; it only edits (an image and a mask)."""

    inpainting = True
    ays_name = None

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        """The sampled latents: the VAE's channels (the U-Net takes 9 = 4 + mask + 4)."""
        return (self.pipe.vae.config.latent_channels, size // self.vae_scale,
                size // self.vae_scale)

    @torch.inference_mode()
    def inpaint_condition(self, image: np.ndarray, editable: np.ndarray,
                          generator: torch.Generator) -> torch.Tensor:
        """(1 + C, h, w): the latent-size mask and the masked image's latents, drawn as the
        pipeline draws them (after the noise)."""
        from PIL import Image

        pipe = self.pipe
        pixels = pipe.image_processor.preprocess(Image.fromarray(image))
        mask = torch.from_numpy(editable.astype(np.float32))[None, None]
        masked = pixels * (mask < 0.5)
        vae = pipe.vae
        z = vae.encode(masked.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        z = z * vae.config.scaling_factor
        small = torch.nn.functional.interpolate(mask, size=tuple(z.shape[-2:]))
        return torch.cat([small, z.float().cpu()], 1)[0]


class LCMFamily(SDFamily):
    ays_name = None

    """Latent consistency models: guidance enters as a w embedding, not as CFG rows."""

    guidance_embedded = True

    def unet_inputs(self, x: torch.Tensor, cond: PromptEmbeds,
                    guidance: torch.Tensor) -> dict[str, Any]:
        # the pipeline's Imagen-style convention: w = guidance - 1
        w = self.pipe.get_guidance_scale_embedding(
            guidance - 1, embedding_dim=self.pipe.unet.config.time_cond_proj_dim)
        return {"timestep_cond": w.to(x.device, x.dtype),
                "encoder_hidden_states": self._t(cond, "hidden", x)}


class PixArtFamily(SDFamily):
    """PixArt-Sigma: a DiT (adaLN-single) over masked T5 states; a learned-sigma output
    keeps only its noise half."""

    max_sequence_length = 300
    ays_name = None
    denoiser_name = "transformer"

    def encode(self, prompts: list[str], device: torch.device) -> PromptEmbeds:
        hidden, mask, _, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=device, clean_caption=False,
            max_sequence_length=self.max_sequence_length)
        return PromptEmbeds({"hidden": hidden, "mask": mask})

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds,
                guidance: torch.Tensor) -> torch.Tensor:
        model = self.pipe.transformer
        out = model(x, encoder_hidden_states=self._t(cond, "hidden", x),
                    encoder_attention_mask=cond.tensors["mask"].to(x.device), timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                    return_dict=False)[0]
        if model.config.out_channels // 2 == x.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return out


class PixArtAlphaFamily(PixArtFamily):
    max_sequence_length = 120


class SD3Family(SDFamily):
    """SD3 / SD3.5: MMDiT over CLIP-L + CLIP-G + T5 states and pooled CLIP vectors;
    flow matching."""

    flow = True

    def start_step(self, steps: int, strength: float) -> int:
        """Flow-matching img2img pipelines keep int(steps - steps * strength) steps off
        the front (no rounding of steps * strength first)."""
        return min(steps - 1, int(max(steps - steps * strength, 0)))
    ays_name = None
    denoiser_name = "transformer"

    def set_timesteps(self, scheduler: Any, steps: int, size: int) -> None:
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
                calculate_shift,
            )

            _, h, w = self.latent_shape(size)
            p = self.denoiser.config.patch_size
            c = scheduler.config
            kwargs["mu"] = calculate_shift((h // p) * (w // p),
                                           c.get("base_image_seq_len", 256),
                                           c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        scheduler.set_timesteps(steps, device="cpu", **kwargs)

    def encode(self, prompts: list[str], device: torch.device) -> PromptEmbeds:
        hidden, _, pooled, _ = self.pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=False)
        return PromptEmbeds({"hidden": hidden, "pooled": pooled})

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds,
                guidance: torch.Tensor) -> torch.Tensor:
        return self.pipe.transformer(hidden_states=x, timestep=t.to(x.dtype),
                                     encoder_hidden_states=self._t(cond, "hidden", x),
                                     pooled_projections=self._t(cond, "pooled", x),
                                     return_dict=False)[0]


class FluxFamily(SDFamily):
    """FLUX.1 (schnell / dev): packed 2x2 latent patches with position ids, T5 states
    plus a pooled CLIP vector, guidance as an input where the model embeds it; flow
    matching with a resolution-dependent shift."""

    guidance_embedded = True
    flow = True
    ays_name = None
    denoiser_name = "transformer"

    def default_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def _hw(self, size: int) -> tuple[int, int]:
        h = 2 * (size // (self.pipe.vae_scale_factor * 2))
        return h, h

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        h, w = self._hw(size)
        c = self.denoiser.config.in_channels // 4
        return (c, h, w)

    def initial_noise(self, size: int, generator: torch.Generator) -> torch.Tensor:
        c, h, w = self.latent_shape(size)
        noise = torch.randn((1, c, h, w), generator=generator)
        return self.pipe._pack_latents(noise, 1, c, h, w)

    def set_timesteps(self, scheduler: Any, steps: int, size: int) -> None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        h, w = self._hw(size)
        c = scheduler.config
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if c.get("use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                             c.get("max_shift", 1.15))
        scheduler.set_timesteps(steps, device="cpu", sigmas=sigmas, mu=mu)

    def encode(self, prompts: list[str], device: torch.device) -> PromptEmbeds:
        hidden, pooled, _ = self.pipe.encode_prompt(prompts, None, device=device)
        return PromptEmbeds({"hidden": hidden, "pooled": pooled})

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds,
                guidance: torch.Tensor) -> torch.Tensor:
        model = self.pipe.transformer
        hidden = self._t(cond, "hidden", x)
        n_tokens = x.shape[1]
        side = int(round(n_tokens ** 0.5))
        img_ids = self.pipe._prepare_latent_image_ids(1, side, side, x.device, x.dtype)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=x.device, dtype=x.dtype)
        g = (guidance.to(x.device, torch.float32) if model.config.guidance_embeds else None)
        return model(hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=g,
                     pooled_projections=self._t(cond, "pooled", x),
                     encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=img_ids,
                     return_dict=False)[0]

    start_step = SD3Family.start_step

    def to_model_space(self, z: torch.Tensor) -> torch.Tensor:
        n, c, h, w = z.shape
        return self.pipe._pack_latents(z, n, c, h, w)

    def model_mask(self, editable: np.ndarray, size: int) -> torch.Tensor:
        c, h, w = self.latent_shape(size)
        m = mask_tensor(editable, (h, w)).expand(c, h, w)
        return self.pipe._pack_latents(m[None].contiguous(), 1, c, h, w)[0]

    def decoder_latents(self, x: torch.Tensor, size: int) -> torch.Tensor:
        return self.pipe._unpack_latents(x, size, size, self.pipe.vae_scale_factor)


FAMILIES: dict[str, type[SDFamily]] = {
    "StableDiffusionPipeline": SDFamily, "StableDiffusionXLPipeline": SDXLFamily,
    "StableDiffusionInpaintPipeline": SDInpaintFamily,
    "LatentConsistencyModelPipeline": LCMFamily, "PixArtSigmaPipeline": PixArtFamily,
    "PixArtAlphaPipeline": PixArtAlphaFamily, "StableDiffusion3Pipeline": SD3Family,
    "FluxPipeline": FluxFamily}


def family_of(pipe: Any) -> SDFamily:
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise ValueError(f"{name} is not supported yet; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name](pipe)
