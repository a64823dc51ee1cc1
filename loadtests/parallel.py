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
                window: int = 8, tol: float = 1e-3, images: int = 1) -> dict:
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
        states = [init_state(seed + i, steps, cond, uncond, shape=info.image_shape,
                             guidance=guidance, time_shift=info.time_shift)
                  for i in range(images)]  # one request's `n` images
        start = time.perf_counter()
        if mode == "paradigms":
            out, rounds = paradigms_sample(denoise, states[0], window, tol)
            outs = [out]
        else:
            outs = run_to_completion(denoise, states)
        times.append(time.perf_counter() - start)
        x = torch.stack([o.x for o in outs])
    times = sorted(times[1:] or times)
    return {"mode": mode, "latency_s": times[len(times) // 2], "rounds": rounds, "x": x}


def run(mode: str, procs: int, steps: int, guidance: float, seed: int, repeats: int,
        images: int = 1) -> dict:
    args = (mode, steps, guidance, seed, repeats, 8, 1e-3, images)
    if procs == 1:
        torch.set_num_threads(1)
        return _trajectory(*args)
    from stepserve.engines.distributed import spawn

    return spawn(_trajectory, procs, args, threads=1)


def paradigms_accuracy(n: int, steps: int, guidance: float | None, window: int, tol: float,
                       sets: tuple[str, ...] = ("seen", "unseen"), chunk: int = 16
                       ) -> list[dict]:
    """All-five accuracy of ParaDiGMS vs sequential sampling on the yardstick's prompts,
    from the same seeds; requests go through Picard iteration `chunk` at a time, their
    windows sharing each forward."""
    import numpy as np

    from stepserve.engines.torch_engine import TorchEngine
    from stepserve.models.builtin.yardstick import Yardstick, prompt_set
    from stepserve.models.sampling.paradigms import paradigms_sample_many
    from stepserve.server.scheduler.offline import generate_offline

    engine = TorchEngine()
    engine.warmup((1, 16))
    guidance = engine.info.default_guidance if guidance is None else guidance
    yardstick, rows = Yardstick(), []
    for name in sets:
        ps = prompt_set(name, n)
        sequential = generate_offline(engine, ps.prompts, ps.seeds, steps, guidance=guidance)
        images, rounds = [], []
        for lo in range(0, n, chunk):
            prompts, seeds = ps.prompts[lo:lo + chunk], ps.seeds[lo:lo + chunk]
            cond, uncond = engine.encode(list(prompts)), engine.encode([""] * len(prompts))
            states = [engine.init_state(seed, steps, cond.select([i]), uncond.select([0]),
                                        guidance=guidance) for i, seed in enumerate(seeds)]
            done, r = paradigms_sample_many(engine.denoise, states, window, tol)
            images.append(engine.decode(torch.stack([d.x for d in done])))
            rounds += r
        picard = np.concatenate(images)
        a = yardstick.accuracy(sequential, ps.labels)["all_five"]
        b = yardstick.accuracy(picard, ps.labels)["all_five"]
        grey = float(np.abs(sequential.astype(int) - picard.astype(int)).mean())
        rows.append({"set": name, "prompts": n, "steps": steps, "guidance": guidance,
                     "sequential_all_five": a, "paradigms_all_five": b, "difference": b - a,
                     "mean_rounds": float(np.mean(rounds)), "max_rounds": int(max(rounds)),
                     "mean_abs_grey_levels": grey})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="stepserve bench parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--guidance", type=float, default=3.0,
                   help="> 1 so CFG parallel has two halves to split")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--images", type=int, default=1, help="the request's n (images)")
    p.add_argument("--modes", default="paradigms,cfg,sequence",
                   help="which of paradigms, cfg, sequence to time against sequential")
    p.add_argument("--accuracy", type=int, default=0, metavar="N",
                   help="also score ParaDiGMS vs sequential on N yardstick prompts per set")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.accuracy:
        acc = paradigms_accuracy(args.accuracy, args.steps, None, args.window, args.tol)
        print("| set | prompts | steps | sequential all-five | ParaDiGMS all-five | "
              "difference | mean rounds | mean abs grey levels |\n" + "|---" * 8 + "|")
        for r in acc:
            print(f"| {r['set']} | {r['prompts']} | {r['steps']} | "
                  f"{r['sequential_all_five']:.1f} | {r['paradigms_all_five']:.1f} | "
                  f"{r['difference']:+.1f} | {r['mean_rounds']:.1f} | "
                  f"{r['mean_abs_grey_levels']:.2f} |")
        if args.json:
            args.json.with_suffix(".accuracy.json").write_text(json.dumps(acc, indent=2))
    modes = args.modes.split(",")
    common = (args.steps, args.guidance, args.seed, args.repeats, args.images)
    base = run("sequential", 1, *common)
    rows = [(f"1 process x 1 thread, sequential, n={args.images}", base)]
    if "paradigms" in modes and args.images == 1:
        rows.append(("1 process x 1 thread, ParaDiGMS (window 8, tol 1e-3)",
                     run("paradigms", 1, *common)))
    for mode in ("cfg", "sequence"):
        if mode in modes:
            rows.append((f"2 processes x 1 thread, {mode} parallel, n={args.images}",
                         run(mode, 2, *common)))
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
