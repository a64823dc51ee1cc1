"""GPU check for the engines (issue 4): PyTorch fp16/bf16, eager vs torch.compile vs CUDA
graphs, on an SD-Turbo-class UNet (diffusers' UNet2DConditionModel from the published
SD 2.1 / SD-Turbo config, random weights) at 512x512, batch 1/4/16; plus the built-in
model through the torch, onnxruntime (CUDA provider) and tensorrt engines where present.

    python scripts/gpu_check.py --out docs/gpu-check.md      # (scripts/gpu_check.sh)

Prints one markdown table per part and writes them to --out. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

# SD-Turbo's UNet is SD 2.1's: the config published with stabilityai/sd-turbo.
SD_TURBO_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, act_fn="silu",
)


def cuda_time(fn: Callable[[], object], iters: int = 10, warmup: int = 3) -> float:
    """Median seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def unet_rows(batches: list[int], modes: list[str], dtypes: list[str]) -> list[str]:
    from diffusers import UNet2DConditionModel

    rows = ["| model | dtype | mode | batch | ms / forward | images/s (1 step) |",
            "|---|---|---|---|---|---|"]
    for dtype_name in dtypes:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
        base = UNet2DConditionModel(**SD_TURBO_UNET).to("cuda", dtype).eval()
        for mode in modes:
            torch._dynamo.reset()
            if mode == "eager":
                model = base
            elif mode == "compile":
                model = torch.compile(base, mode="max-autotune-no-cudagraphs")
            else:  # CUDA graphs through torch.compile's reduce-overhead mode
                model = torch.compile(base, mode="reduce-overhead")
            for b in batches:
                x = torch.randn(b, 4, 64, 64, device="cuda", dtype=dtype)
                ctx = torch.randn(b, 77, 1024, device="cuda", dtype=dtype)
                t = torch.full((b,), 999, device="cuda")
                with torch.inference_mode():
                    s = cuda_time(partial(model, x, t, encoder_hidden_states=ctx))
                rows.append(f"| SD-Turbo UNet 512x512 | {dtype_name} | {mode} | {b} | "
                            f"{s * 1000:.1f} | {b / s:.1f} |")
                print(rows[-1], flush=True)
        del base
        torch.cuda.empty_cache()
    return rows


def builtin_rows(batches: list[int]) -> list[str]:
    from stepserve.engines.registry import create_engine
    from stepserve.models.builtin.text import TextEncoder

    encoder = TextEncoder(device="cuda")
    variants = [("torch", "fp32", {}), ("torch", "bf16", {}), ("torch", "fp16", {}),
                ("torch", "fp16", {"compile": True}), ("onnxruntime", "fp32", {}),
                ("tensorrt", "fp16", {}), ("tensorrt", "int8", {})]
    rows = ["| built-in model | precision | options | batch | ms / forward | images/s (4 steps) |",
            "|---|---|---|---|---|---|"]
    for name, precision, extra in variants:
        try:
            engine = create_engine(name, precision=precision, device="cuda", encoder=encoder,
                                   **extra)
        except Exception as exc:  # a missing optional backend is reported, not fatal
            rows.append(f"| {name} | {precision} | {extra} | - | not run: "
                        f"{type(exc).__name__}: {str(exc)[:80]} | - |")
            print(rows[-1], flush=True)
            continue
        for b in batches:
            text = engine.encode(["a small red circle in the top left on a white background"]
                                 * b)
            x = torch.randn(b, 3, 32, 32, device="cuda")
            t, d = torch.rand(b, device="cuda"), torch.full((b,), 0.25, device="cuda")
            s = cuda_time(partial(engine.denoise, x, t, d, text))
            rows.append(f"| {name} | {precision} | {extra or ''} | {b} | {s * 1000:.2f} | "
                        f"{b / (4 * s):.0f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/gpu-check.md"))
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--modes", default="eager,compile,cudagraphs")
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--skip-unet", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script is for GPU machines")
    batches = [int(b) for b in args.batches.split(",")]
    start = time.perf_counter()
    parts = [f"# GPU check\n\nDevice: {torch.cuda.get_device_name()}, torch {torch.__version__}"]
    parts.append("\n".join(builtin_rows(batches)))
    if not args.skip_unet:
        parts.append("\n".join(unet_rows(batches, args.modes.split(","),
                                         args.dtypes.split(","))))
    parts.append(f"Total run time: {time.perf_counter() - start:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(parts) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
