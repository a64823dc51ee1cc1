"""GPU check for the diffusers families (issue 6): real-size architectures with random
weights (the published configs; nothing downloaded), images/s at batch 1/4/16 through
the stepserve server (in-process uvicorn, HTTP clients) and through the plain diffusers
pipeline `__call__`, side by side.

    python scripts/gpu_families.py --out docs/gpu-families.md
    python scripts/gpu_families.py --tiny --out /tmp/t.md   # a CPU dry run of the script

Tokenizers are the small byte-level / unigram ones from models/families/tiny.py
(token ids stay inside the real vocabularies), so text-encoder FLOPs are real
while the images are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from pathlib import Path

import torch

from stepserve.models.families.tiny import clip_tokenizer, t5_tokenizer

SD_TURBO_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def clip(hidden: int, layers: int, heads: int, projection: int | None, tok):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=hidden * 4,
                         num_attention_heads=heads, num_hidden_layers=layers, vocab_size=49408,
                         projection_dim=projection or hidden, max_position_embeddings=77,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_tiny(family: str, work: Path):
    """The tiny random pipelines of the tests, for a CPU dry run of this script."""
    import diffusers as d

    from stepserve.models.families import tiny

    maker = {"sd-turbo": tiny.tiny_sd, "sdxl-turbo": tiny.tiny_sdxl,
             "flux-schnell": tiny.tiny_flux}[family]
    folder = work / family
    if not (folder / "model_index.json").is_file():
        maker(folder)
    return d.DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)


def build(family: str, dtype: torch.dtype, work: Path):
    import diffusers as d

    tok = clip_tokenizer(work / "tok")
    with torch.device("cuda"):
        if family == "sd-turbo":
            pipe = d.StableDiffusionPipeline(
                vae=d.AutoencoderKL(**VAE), text_encoder=clip(1024, 23, 16, None, tok),
                tokenizer=tok, unet=d.UNet2DConditionModel(**SD_TURBO_UNET),
                scheduler=d.EulerDiscreteScheduler(timestep_spacing="trailing"),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        elif family == "sdxl-turbo":
            pipe = d.StableDiffusionXLPipeline(
                vae=d.AutoencoderKL(**VAE), text_encoder=clip(768, 12, 12, None, tok),
                text_encoder_2=clip(1280, 32, 20, 1280, tok), tokenizer=tok, tokenizer_2=tok,
                unet=d.UNet2DConditionModel(**SDXL_UNET),
                scheduler=d.EulerDiscreteScheduler(timestep_spacing="trailing"))
        else:
            from transformers import T5Config, T5EncoderModel

            t5 = T5EncoderModel(T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                         num_heads=64, vocab_size=32128,
                                         feed_forward_proj="gated-gelu"))
            vae = d.AutoencoderKL(**{**VAE, "latent_channels": 16}, shift_factor=0.1159,
                                  scaling_factor=0.3611)
            pipe = d.FluxPipeline(
                transformer=d.FluxTransformer2DModel(**FLUX),
                scheduler=d.FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
                text_encoder=clip(768, 12, 12, None, tok), tokenizer=tok, text_encoder_2=t5,
                tokenizer_2=t5_tokenizer())
    return pipe.to(dtype=dtype)


def serve(engine, port: int):
    import uvicorn

    from stepserve.server.app import create_app
    from stepserve.server.settings import Settings

    app = create_app(Settings(max_batch_size=16, max_queue=512, warmup_batch_sizes=[1]),
                     builder=lambda s: engine, load_in_background=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    import httpx

    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


async def through_server(port: int, batch: int, steps: int, rounds: int) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=600) as c:
        start = time.perf_counter()
        for r in range(rounds):
            await asyncio.gather(*(c.post(f"http://127.0.0.1:{port}/v1/images/generations",
                                          json={"prompt": "a photo of a cat", "seed": r * 100 + i,
                                                "num_inference_steps": steps,
                                                "guidance_scale": 1.0})
                                   for i in range(batch)))
        return rounds * batch / (time.perf_counter() - start)


def through_pipeline(pipe, batch: int, steps: int, rounds: int, size: int) -> float:
    kwargs = {"height": size, "width": size} if "Flux" in type(pipe).__name__ else {}
    pipe(["a photo of a cat"] * batch, num_inference_steps=steps, guidance_scale=0.0,
         output_type="np", **kwargs)  # warm
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(rounds):
        pipe(["a photo of a cat"] * batch, num_inference_steps=steps, guidance_scale=0.0,
             output_type="np", **kwargs)
    sync()
    return rounds * batch / (time.perf_counter() - start)


def main() -> None:
    from stepserve.engines.diffusers_engine import DiffusersEngine

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/gpu-families.md"))
    p.add_argument("--families", default="sd-turbo,sdxl-turbo,flux-schnell")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/stepserve-gpu"))
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (dry run)")
    args = p.parse_args()
    steps = {"sd-turbo": 1, "sdxl-turbo": 1, "flux-schnell": 4}
    sizes = ({"sd-turbo": 32, "sdxl-turbo": 32, "flux-schnell": 16} if args.tiny else
             {"sd-turbo": 512, "sdxl-turbo": 1024, "flux-schnell": 1024})
    rows = ["| family | size | batch | steps | server images/s | pipeline images/s | ratio |",
            "|---|---|---|---|---|---|---|"]
    for port, family in enumerate(args.families.split(","), start=18300):
        try:
            pipe = (build_tiny(family, args.work) if args.tiny
                    else build(family, torch.bfloat16, args.work))
            engine = DiffusersEngine.from_pipeline(family, pipe, image_size=sizes[family])
            serve(engine, port)
        except Exception as exc:  # e.g. out of memory: report and go on
            rows.append(f"| {family} | - | - | - | not run: {type(exc).__name__}: "
                        f"{str(exc)[:80]} | - | - |")
            print(rows[-1], flush=True)
            continue
        for b in (int(x) for x in args.batches.split(",")):
            srv = asyncio.run(through_server(port, b, steps[family], args.rounds))
            ref = through_pipeline(pipe, b, steps[family], args.rounds, sizes[family])
            rows.append(f"| {family} | {sizes[family]} | {b} | {steps[family]} | {srv:.2f} | "
                        f"{ref:.2f} | {srv / ref:.2f} |")
            print(rows[-1], flush=True)
        del pipe, engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# GPU check: model families\n\nDevice: {device}\n\n"
                        + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
