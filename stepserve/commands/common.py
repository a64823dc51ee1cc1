"""Flags shared by the commands that run the model (see ../shared/spec/cli.md)."""

from __future__ import annotations

import argparse


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="torch", help="engine (default torch)")
    p.add_argument("--batching", default="step", choices=["step", "request"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="numeric precision of the denoiser (default fp32)")
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
