"""`stepserve bench NAME [ARGS]`: the load tests and serving benchmarks in loadtests/."""

from __future__ import annotations

import argparse
import importlib

HELP = ("benchmarks that print tables: openloop, batching, overhead, soak, engines, caches, "
        "parallel, faults, scaleout, flood, drain, edits, lora, slo, image, noise")

# bench name -> module under stepserve.loadtests; each has main(argv)
BENCHES = {
    "openloop": "openloop",
    "batching": "compare_batching",
    "overhead": "overhead",
    "soak": "soak",
    "engines": "engines",
    "caches": "caches",
    "parallel": "parallel",
    "faults": "faults",
    "scaleout": "scaleout",
    "flood": "flood",
    "drain": "drain",
    "edits": "edits",
    "lora": "lora",
    "slo": "slo",
    "image": "image",
    "noise": "noise_scale",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bench", choices=sorted(BENCHES),
                   help="openloop: Poisson load against a running server; batching: step vs "
                        "request batching; overhead: server vs raw engine; soak: many clients; "
                        "engines: quality and speed per engine and precision; caches: "
                        "step caches' compute saved vs quality; parallel: one request "
                        "across processes; faults: workers and Redis killed under load "
                        "(lost / duplicated jobs); scaleout: api + worker over Redis vs "
                        "the all-in-one server; flood: server memory under a flood of cache-hit "
                        "jobs and a huge body; drain: SIGTERM with work in flight; edits: recolour "
                        "and inpaint quality on the built-in model; lora: mixed-adapter "
                        "batches vs none and vs split by adapter, and adapter quality; slo: "
                        "goodput under overload with and without deadline scheduling; image: the "
                        "CPU image vs the same server outside it; noise: the built-in model's "
                        "initial-noise scale, quality vs variety")
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="the benchmark's own flags (`stepserve bench NAME --help`)")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"stepserve.loadtests.{BENCHES[args.bench]}")
    module.main(args.bench_args)
    return 0
