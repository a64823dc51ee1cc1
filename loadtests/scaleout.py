"""The queue's overhead: `stepserve api` + one `stepserve worker` over Redis against
the all-in-one `stepserve serve`, with the same engine flags and the same closed-loop
load, alternated in rounds on this machine (API, worker and Redis share its cores).

    stepserve bench scaleout --precision bf16 --batch 16 --steps 4 --duration 30 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

from .cluster import Cluster
from .launch import server
from .overhead import saturate
from .redis_server import RedisServer


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="stepserve bench scaleout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--batch", type=int, default=16, help="--max-batch-size of both")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--clients", type=int, default=32, help="concurrent closed-loop clients")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--fsync", default="everysec", choices=["always", "everysec", "off"],
                   help="Redis append-only file fsync policy")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    engine = ["--precision", args.precision, "--max-batch-size", str(args.batch),
              "--max-queue", "1000", "--log-level", "warning"]
    if args.threads:
        engine += ["--threads", str(args.threads)]
    rows = []
    for r in range(args.rounds):
        with server(*engine) as url:
            alone = asyncio.run(saturate(url, args.clients, args.steps, args.duration))
        with RedisServer(fsync=args.fsync) as rs, Cluster(rs.url, tuple(engine),
                                                           ("--max-queue", "1000")) as cl:
            cl.add_worker()
            cl.start_api()
            queued = asyncio.run(saturate(cl.url, args.clients, args.steps, args.duration))
        rows.append({"round": r, "all_in_one": alone, "api_worker": queued,
                     "ratio": queued / alone})
        print(f"round {r}: all-in-one {alone:.1f}, api+worker {queued:.1f} images/s")
    ratio = statistics.median(row["ratio"] for row in rows)
    print("| round | all-in-one images/s | api + worker images/s | ratio |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['round']} | {row['all_in_one']:.1f} | {row['api_worker']:.1f} | "
              f"{row['ratio']:.2f} |")
    print(f"median ratio api+worker / all-in-one: {ratio:.2f}")
    result = {"rows": rows, "median_ratio": ratio, "args": {
        k: v for k, v in vars(args).items() if k != "json"}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
