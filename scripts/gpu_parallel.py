"""Multi-GPU check for parallel denoising (issue 8): single-request latency at 32 steps
on one GPU vs CFG parallel and Ulysses sequence parallel over 2 GPUs (NCCL), plus
ParaDiGMS rounds, with output equality. Needs at least 2 CUDA devices.

    python scripts/gpu_parallel.py --out docs/gpu-parallel.md

For diffusers transformers (FLUX, SD3, ...) diffusers' own context parallelism
(`ContextParallelConfig`, `transformer.enable_parallelism(...)`) applies; this
script measures the built-in DiT, whose sequence parallelism is stepserve's own.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROMPT = "a small red circle in the top left on a white background"


def trajectory(rank: int, world: int, port: int, mode: str, steps: int, out) -> None:
    from stepserve.engines.distributed import CFGParallel, SequenceParallel, init
    from stepserve.engines.torch_engine import TorchEngine
    from stepserve.models.sampling.paradigms import paradigms_sample
    from stepserve.models.sampling.state import init_state, run_to_completion

    if world > 1:
        init(rank, world, port, backend="nccl")
    device = f"cuda:{rank}"
    torch.cuda.set_device(device)
    engine = TorchEngine(device=device)
    cond, uncond = engine.encode([PROMPT]), engine.encode([""])
    denoise = {"single": engine.denoise, "paradigms": engine.denoise,
               "cfg": CFGParallel(engine.denoise),
               "sequence": SequenceParallel(engine.dit)}[mode]
    times, rounds = [], steps
    for _ in range(6):
        state = init_state(1, steps, cond, uncond, shape=engine.info.image_shape,
                           guidance=3.0, time_shift=engine.info.time_shift)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if mode == "paradigms":
            final, rounds = paradigms_sample(denoise, state, 16, 1e-3)
        else:
            final = run_to_completion(denoise, [state], device=device)[0]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put((mode, sorted(times[1:])[2], rounds, final.x.cpu().numpy()))
    if world > 1:
        dist.destroy_process_group()


def run(mode: str, world: int, steps: int):
    from stepserve.engines.distributed import free_port

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=trajectory, args=(r, world, port, mode, steps, q))
             for r in range(world)]
    for p in procs:
        p.start()
    result = q.get()
    for p in procs:
        p.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/gpu-parallel.md"))
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs at least 2 CUDA devices")
    base = run("single", 1, args.steps)
    rows = ["| variant | latency ms | speed-up | rounds | rel. L2 |", "|---|---|---|---|---|"]
    import numpy as np

    for mode, world in (("single", 1), ("paradigms", 1), ("cfg", 2), ("sequence", 2)):
        r = base if mode == "single" else run(mode, world, args.steps)
        rel = float(np.linalg.norm(r[3] - base[3]) / np.linalg.norm(base[3]))
        rows.append(f"| {mode} ({world} GPU) | {r[1] * 1000:.1f} | {base[1] / r[1]:.2f} | "
                    f"{r[2]} | {rel:.1e} |")
        print(rows[-1], flush=True)
    args.out.write_text(f"# GPU check: parallel denoising\n\nDevices: "
                        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}\n\n"
                        + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
