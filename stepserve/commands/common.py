"""Flags shared by the commands that run the model (the contract: docs/cli.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="torch", choices=["torch", "onnxruntime", "tensorrt"],
                   help="engine (default torch)")
    p.add_argument("--batching", default="step", choices=["step", "request"])
    p.add_argument("--precision", default="fp32",
                   choices=["fp32", "bf16", "fp16", "int8", "fp8"],
                   help="numeric precision of the denoiser (default fp32); int8: onnxruntime "
                        "or tensorrt (torch: int8 weights via torchao), fp8: tensorrt")
    p.add_argument("--quantization", default="static", choices=["static", "dynamic"],
                   help="int8 with onnxruntime: static QDQ (calibrated, default) or dynamic")
    p.add_argument("--build-dir", type=Path, default=None,
                   help="engine build cache (default ~/.cache/stepserve/builds)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--max-batch-size", type=int, default=64,
                   help="most samples in one denoiser forward (default 64)")
    p.add_argument("--sampler", default="euler", choices=["euler", "flow-euler"],
                   help="euler: shortcut-aware Euler (default); flow-euler: plain velocity")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")


def apply_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def engine_from_args(args: argparse.Namespace, **extra: Any):
    """The engine the flags name, built the same way `serve` builds it."""
    from stepserve.engines.registry import create_engine
    from stepserve.server.runtime import engine_kwargs
    from stepserve.server.settings import Settings

    settings = Settings(engine=args.engine, precision=args.precision, device=args.device,
                        quantization=args.quantization, build_dir=args.build_dir,
                        threads=args.threads, max_batch_size=args.max_batch_size)
    kwargs = engine_kwargs(settings)
    kwargs.pop("default_steps")
    return create_engine(args.engine, **kwargs, **extra)
