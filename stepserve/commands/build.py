"""`stepserve build`: export / quantize / calibrate / compile an engine ahead of serving.

`serve`, `generate` and `eval` with the same --engine/--precision/--quantization
then find the build in the cache (and build lazily on first use if none exists).
"""

from __future__ import annotations

import argparse
import json
import time

from .common import CommandError, add_model_flags, load_model

HELP = "build an engine ahead of serving (ONNX export, int8 calibration, TensorRT plan)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--list", action="store_true", help="list cached builds and exit")
    p.add_argument("--qsched", action="store_true",
                   help="int8: search the Q-Sched sampler correction and store it with the build")
    p.add_argument("--qsched-steps", type=int, default=4, help="steps the Q-Sched search uses")
    p.add_argument("--check-batch", type=int, default=16,
                   help="after building, compare with torch fp32 on a batch this big")


def check(engine, batch: int) -> dict[str, float]:
    """Output error against the torch fp32 engine, and forward time, on one mixed batch."""
    import torch

    from stepserve.engines.torch_engine import TorchEngine
    from stepserve.models.builtin.yardstick import prompt_set

    reference = TorchEngine(dit=engine.dit, encoder=engine.encoder)
    gen = torch.Generator().manual_seed(1)
    c, h, w = engine.info.image_shape
    x = torch.randn(batch, c, h, w, generator=gen)
    t = torch.rand(batch, generator=gen)
    d = torch.full((batch,), 0.25)
    text = engine.encode(list(prompt_set("unseen", batch, seed=3).prompts))
    ref = reference.denoise(x, t, d, text)
    out = engine.denoise(x, t, d, text)
    start = time.perf_counter()
    for _ in range(5):
        engine.denoise(x, t, d, text)
    forward_s = (time.perf_counter() - start) / 5
    rel = float(torch.linalg.norm(out.cpu() - ref) / torch.linalg.norm(ref))
    return {"relative_error_vs_torch_fp32": rel, "forward_s": forward_s,
            "images_per_s_at_4_steps": batch / (4 * forward_s)}


def save_qsched(engine, steps: int) -> None:
    from stepserve.engines.ort_engine import QSCHED_FILE
    from stepserve.engines.qsched_search import search_qsched

    result = search_qsched(engine, steps=steps)
    path = engine.graph_path.parent / QSCHED_FILE
    result.best.save(path, steps=steps, score=result.score, identity_score=result.identity_score)
    print(f"Q-Sched c_m={result.best.model} c_s={result.best.sample} score={result.score:.4f} "
          f"(no correction: {result.identity_score:.4f}) -> {path}")


def run(args: argparse.Namespace) -> int:
    from stepserve.engines.build_cache import BuildCache
    from stepserve.engines.ort_engine import OnnxRuntimeEngine

    from .common import load_settings

    settings = load_settings(args)
    cache = BuildCache(settings.build_dir)
    if args.list:
        for entry in cache.entries():
            print(json.dumps(entry))
        return 0
    if settings.engine == "torch":
        raise CommandError("the torch engine needs no build; use --engine onnxruntime or "
                           "tensorrt")
    if args.qsched and (settings.precision == "fp32" or settings.engine != "onnxruntime"):
        raise CommandError("--qsched applies to quantized onnxruntime builds")
    if args.qsched and not 1 <= args.qsched_steps <= settings.max_steps:
        raise CommandError(f"--qsched-steps must be between 1 and max_steps "
                           f"({settings.max_steps})")
    if args.check_batch < 1:
        raise CommandError(f"--check-batch {args.check_batch}: give 1 or more")
    start = time.perf_counter()
    settings, engine = load_model(args)
    seconds = time.perf_counter() - start
    where = engine.graph_path if isinstance(engine, OnnxRuntimeEngine) else cache.root
    print(f"built engine={settings.engine} precision={settings.precision} in {seconds:.1f} s "
          f"(build {engine.build_seconds:.1f} s) -> {where}")
    if args.qsched:
        save_qsched(engine, args.qsched_steps)
    result = check(engine, args.check_batch)
    print(" ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return 0
