"""Step caches: compute saved vs quality per step count, and server throughput with caches.

    stepserve bench caches --prompts 200 --steps 4,8,16,32 --plot docs/caches.png

Quality: the built-in yardstick (all-five accuracy, FD) on the seen prompts.
Compute: denoiser rows actually run, relative to no cache. Throughput: the
server at saturation at `--server-steps` steps, cache off vs on, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch

from stepserve.engines.flow_sampling import FlowSampling
from stepserve.engines.torch_engine import TorchEngine
from stepserve.models.builtin import geometry
from stepserve.models.builtin.yardstick import Yardstick, prompt_set
from stepserve.models.caches.config import CacheConfig
from stepserve.server.scheduler.offline import generate_offline

from .launch import server
from .overhead import saturate

POLICIES: dict[str, dict | None] = {
    "none": None,
    "ab-cache k=2 every 2": {"policy": "ab-cache", "order": 2, "interval": 2},
    "ab-cache k=3 every 2": {"policy": "ab-cache", "order": 3, "interval": 2},
    "ab-cache k=2 every 3": {"policy": "ab-cache", "order": 2, "interval": 3},
    "ab-cache k=3 every 3": {"policy": "ab-cache", "order": 3, "interval": 3},
    "ab-cache k=2 adaptive 0.05": {"policy": "ab-cache", "order": 2, "threshold": 0.05},
    "first-blocks 0.08": {"policy": "first-blocks", "block_threshold": 0.08},
    "first-blocks 0.15": {"policy": "first-blocks", "block_threshold": 0.15},
    "teacache 0.1": {"policy": "teacache", "block_threshold": 0.1},
    "teacache 0.3": {"policy": "teacache", "block_threshold": 0.3},
    "lazydit 0.5": {"policy": "lazydit", "gate_threshold": 0.5},
}


class CountingEngine(FlowSampling):
    """Wraps an engine and counts denoiser work in block-rows (the compute a cache saves):
    a full forward of one row costs `depth`, a block cache's partial one less. The
    sampling contract (FlowSampling) routes every forward through the counters."""

    runs_blocks = True

    def __init__(self, engine: TorchEngine) -> None:
        self.engine, self.info, self.rows = engine, engine.info, 0
        self.depth = len(engine.dit.blocks)
        self.gates = engine.gates
        self.encode, self.decode = engine.encode, engine.decode

    def denoise(self, x, t, d, text):
        self.rows += x.shape[0] * self.depth
        return self.engine.denoise(x, t, d, text)

    def denoise_cached(self, x, t, d, text, rows):
        v, states = self.engine.denoise_cached(x, t, d, text, rows)
        before = sum(r.state.skipped_blocks for r in rows if r is not None)
        after = sum(s.skipped_blocks for s in states if s is not None)
        self.rows += x.shape[0] * self.depth - (after - before)
        return v, states


def quality_rows(engine: CountingEngine, stick: Yardstick, steps_list: list[int], n: int,
                 policies: dict[str, dict | None]) -> list[dict]:
    ps = prompt_set("seen", n)
    rows = []
    for steps in steps_list:
        base_rows = None
        for label, spec in policies.items():
            cfg = CacheConfig.parse(spec)
            engine.rows = 0
            start = time.perf_counter()
            images = generate_offline(engine, ps.prompts, ps.seeds, steps,
                                      cache=cfg if cfg.enabled else None)
            seconds = time.perf_counter() - start
            base_rows = base_rows or engine.rows
            rows.append({"steps": steps, "policy": label,
                         "compute_saved_x": base_rows / engine.rows,
                         "strict_all_five": geometry.accuracy(images, ps.labels)["all_five"],
                         "all_five": stick.accuracy(images, ps.labels)["all_five"],
                         "fd": stick.fd(images, ps.scenes), "images_per_s": n / seconds})
            print(rows[-1], flush=True)
    return rows


def server_rows(precision: str, steps: int, policy: dict, duration: float,
                clients: int) -> list[dict]:
    """One server, saturated twice: requests without a cache, then with `policy`."""
    out = []
    with server("--precision", precision, "--max-batch-size", "16", "--max-queue",
                "1000") as url:
        for label, extra in [("no cache", {}), (json.dumps(policy), {"cache": policy})]:
            ips = asyncio.run(saturate(url, clients, steps, duration, extra))
            out.append({"requests": label, "steps": steps, "images_per_s": ips})
            print(out[-1], flush=True)
    out[1]["speedup_x"] = out[1]["images_per_s"] / out[0]["images_per_s"]
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for steps in sorted({r["steps"] for r in rows}):
        sub = [r for r in rows if r["steps"] == steps]
        ax.plot([r["compute_saved_x"] for r in sub], [r["all_five"] for r in sub], "o",
                label=f"{steps} steps")
        for r in sub:
            ax.annotate(r["policy"].replace("ab-cache ", ""), (r["compute_saved_x"],
                        r["all_five"]), fontsize=6)
    ax.set_xlabel("denoiser compute saved (x)")
    ax.set_ylabel("all-five accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="stepserve bench caches", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--steps", default="4,8,16,32")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--server-steps", type=int, default=16)
    p.add_argument("--server-policy", default='{"policy": "ab-cache", "order": 2, "interval": 3}')
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--skip-server", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plot", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = CountingEngine(TorchEngine(precision=args.precision))
    policies = {k: v for k, v in POLICIES.items()
                if engine.gates is not None or (v or {}).get("policy") != "lazydit"}
    rows = quality_rows(engine, Yardstick(), [int(s) for s in args.steps.split(",")],
                        args.prompts, policies)
    cols = ["steps", "policy", "compute_saved_x", "strict_all_five", "all_five", "fd",
            "images_per_s"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |")
    result = {"quality": rows}
    if not args.skip_server:
        result["server"] = server_rows(args.precision, args.server_steps,
                                       json.loads(args.server_policy), args.duration,
                                       args.clients)
        print("| requests | steps | images/s |\n|---|---|---|")
        for r in result["server"]:
            print(f"| {r['requests']} | {r['steps']} | {r['images_per_s']:.1f} |")
        print(f"speedup with cache: {result['server'][1]['speedup_x']:.2f}x")
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
