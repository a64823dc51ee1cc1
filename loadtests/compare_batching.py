"""Step-level vs whole-request batching at the same offered loads (open loop, mixed steps).

    stepserve bench batching --rates 2 4 6 --duration 60 --precision bf16
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from .launch import server
from .openloop import print_table, run_open_loop


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--steps", default="2,4,8")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--max-batch-size", default="16")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--edit-share", type=float, default=0.0,
                   help="fraction of requests that are edits (strengths 0.5/0.75/0.9)")
    args = p.parse_args(argv)
    mix = [int(s) for s in args.steps.split(",")]
    rows = []
    for mode in ("step", "request"):
        with server("--batching", mode, "--precision", args.precision,
                    "--max-batch-size", args.max_batch_size, "--max-queue", "1000",
                    "--queue-share", "1",
                    # each rate replays the same seeded requests: measure batching, not
                    # the exact result cache answering the repeats
                    "--result-cache-mb", "0") as url:
            for rate in args.rates:
                summary = asyncio.run(run_open_loop(url, rate, args.duration, mix,
                                                    edit_share=args.edit_share)).summary()
                rows.append({"label": mode, **summary})
    print_table(rows, label="batching")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
