"""Tiny random-weight diffusers pipelines built from configs (no download), saved with
`save_pretrained`: the test fixtures for the family adapters, and a quick way to try
`stepserve serve --model FOLDER` on a laptop."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode alphabet: every byte gets a printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def clip_tokenizer(folder: Path):
    """A byte-level CLIP tokenizer written locally (256 bytes, their word-end forms,
    a few merges and the two special tokens)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = ["r e", "c i", "ci r", "l e</w>", "s q", "u a"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         model_max_length=77)


def tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0,
            lcm: bool = False, inpaint: bool = False) -> Path:
    """An SD 1.x-style pipeline (UNet, VAE, CLIP) at 32x32 pixels, random weights;
    lcm=True: a latent consistency model (guidance-embedding UNet, LCM scheduler)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = clip_tokenizer(folder / "_tokenizer_src")
    torch.manual_seed(seed)
    vocab = tok.get_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(vocab), max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
        in_channels=9 if inpaint else 4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        time_cond_proj_dim=32 if lcm else None)
    vae = AutoencoderKL(block_out_channels=[32, 64], latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2)
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type=prediction_type)
    if lcm:
        pipe = LatentConsistencyModelPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
            scheduler=LCMScheduler(**common), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    elif inpaint:  # a dedicated inpainting checkpoint: mask + masked latents as inputs
        from diffusers import StableDiffusionInpaintPipeline

        pipe = StableDiffusionInpaintPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
            scheduler=EulerDiscreteScheduler(**common, steps_offset=1), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
            scheduler=EulerDiscreteScheduler(**common, steps_offset=1), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """An SDXL-style pipeline (two CLIP encoders, text_time added conditioning)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer(folder / "_tokenizer_src")
    vocab = tok.get_vocab()
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, vocab_size=len(vocab),
                            max_position_embeddings=77, projection_dim=32,
                            bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
        norm_num_groups=1)
    vae = AutoencoderKL(block_out_channels=[32, 64], latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(config),
                                     text_encoder_2=CLIPTextModelWithProjection(config),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet,
                                     scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def t5_tokenizer():
    """A small unigram T5 tokenizer: a few words, then single letters as fall-back."""
    from transformers import T5Tokenizer

    words = ["a", "red", "blue", "green", "circle", "square", "triangle", "small", "large"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [("▁", -2.0)]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_pixart(folder: Path, seed: int = 0, alpha: bool = False) -> Path:
    """A PixArt-Sigma-style (alpha=True: -alpha) pipeline (adaLN-single DiT over T5
    states) at 16x16 pixels."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tok = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
        num_attention_heads=3, caption_channels=32, in_channels=4, cross_attention_dim=24,
        out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6)
    text_encoder = T5EncoderModel(T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4, vocab_size=len(tok)))
    vae = AutoencoderKL(block_out_channels=[32, 64], latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2)
    cls = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    pipe = cls(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _flow_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                         scaling_factor=1.5035)


def _clip_config(tok, hidden: int = 32):
    from transformers import CLIPTextConfig

    vocab = tok.get_vocab()
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, vocab_size=len(vocab),
                          max_position_embeddings=77, projection_dim=32,
                          bos_token_id=vocab["<|startoftext|>"],
                          eos_token_id=vocab["<|endoftext|>"],
                          pad_token_id=vocab["<|endoftext|>"])


def _t5(tok):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   vocab_size=len(tok)))


def tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """An SD3-style pipeline (MMDiT, two CLIPs with projection + T5, flow matching)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    clip_tok, t5_tok = clip_tokenizer(folder / "_tokenizer_src"), t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4)
    config = _clip_config(clip_tok)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(4), text_encoder=CLIPTextModelWithProjection(config),
        tokenizer=clip_tok, text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer_2=clip_tok, text_encoder_3=_t5(t5_tok), tokenizer_3=t5_tok)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_flux(folder: Path, seed: int = 0, guidance_embeds: bool = False) -> Path:
    """A FLUX-style pipeline (packed latents, CLIP pooled + T5, flow matching);
    guidance_embeds=False is schnell-like, True dev-like."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    clip_tok, t5_tok = clip_tokenizer(folder / "_tokenizer_src"), t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=_flow_vae(1), text_encoder=CLIPTextModel(_clip_config(clip_tok)),
                        tokenizer=clip_tok, text_encoder_2=_t5(t5_tok), tokenizer_2=t5_tok)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
