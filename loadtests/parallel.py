"""One request across processes: single-request latency at 32 steps for CFG parallel,
sequence parallel (Ulysses) and ParaDiGMS, 2 processes x 1 thread vs 1 process x 1
thread, with output equality against sequential sampling.

    stepserve bench parallel --steps 32 --guidance 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PROMPT = "a small red circle in the top left on a white background"


def _trajectory(mode: str, steps: int, guidance: float, seed: int, repeats: int,
                window: int = 8, tol: float = 1e-3) -> dict:
    """Runs on every rank (or alone): the finished image tensor and the median latency."""
    from stepserve.engines.distributed import CFGParallel, SequenceParallel
    from stepserve.engines.torch_engine import TorchEngine
    from stepserve.models.sampling.paradigms import paradigms_sample
    from stepserve.models.sampling.state import init_state, run_to_completion

    engine = TorchEngine()
    info = engine.info
    cond, uncond = engine.encode([PROMPT]), engine.encode([""])
    denoise = {"sequential": engine.denoise, "paradigms": engine.denoise,
               "cfg": CFGParallel(engine.denoise),
               "sequence": SequenceParallel(engine.dit)}[mode]
    times, rounds, x = [], steps, None
    for _ in range(repeats + 1):  # the first run warms up
        state = init_state(seed, steps, cond, uncond, shape=info.image_shape,
                           guidance=guidance, time_shift=info.time_shift)
        start = time.perf_counter()
        if mode == "paradigms":
            out, rounds = paradigms_sample(denoise, state, window, tol)
        else:
            out = run_to_completion(denoise, [state])[0]
        times.append(time.perf_counter() - start)
        x = out.x
    times = sorted(times[1:] or times)
    return {"mode": mode, "latency_s": times[len(times) // 2], "rounds": rounds, "x": x}


def run(mode: str, procs: int, steps: int, guidance: float, seed: int, repeats: int) -> dict:
    if procs == 1:
        torch.set_num_threads(1)
        return _trajectory(mode, steps, guidance, seed, repeats)
    from stepserve.engines.distributed import spawn

    return spawn(_trajectory, procs, (mode, steps, guidance, seed, repeats), threads=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="stepserve bench parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--guidance", type=float, default=3.0,
                   help="> 1 so CFG parallel has two halves to split")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    base = run("sequential", 1, args.steps, args.guidance, args.seed, args.repeats)
    rows = [("1 process x 1 thread, sequential", base)]
    rows.append(("1 process x 1 thread, ParaDiGMS (window 8, tol 1e-3)",
                 run("paradigms", 1, args.steps, args.guidance, args.seed, args.repeats)))
    for mode in ("cfg", "sequence"):
        rows.append((f"2 processes x 1 thread, {mode} parallel",
                     run(mode, 2, args.steps, args.guidance, args.seed, args.repeats)))
    out = []
    print("| variant | latency s | speed-up | sequential rounds | rel. L2 vs sequential |")
    print("|---|---|---|---|---|")
    for label, r in rows:
        rel = float((r["x"] - base["x"]).norm() / base["x"].norm())
        out.append({"variant": label, "latency_s": r["latency_s"],
                    "speedup": base["latency_s"] / r["latency_s"], "rounds": r["rounds"],
                    "rel_l2": rel})
        print(f"| {label} | {r['latency_s']:.3f} | {out[-1]['speedup']:.2f} | "
              f"{r['rounds']} | {rel:.2e} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
