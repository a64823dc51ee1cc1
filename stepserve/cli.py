"""The `stepserve` console script: one parser, one module per sub-command."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# sub-command -> module under stepserve.commands (imported lazily: torch is slow to import)
COMMANDS = {
    "serve": "serve",
    "api": "api",
    "worker": "worker",
    "generate": "generate",
    "train-builtin": "train_builtin",
    "eval": "evaluate",
    "build": "build",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f"stepserve.commands.{module}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # On small shared CPUs, OpenMP threads that spin at barriers slow torch ~5x as soon
    # as any other process wants a core; sleeping waits cost little when uncontended.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .commands.common import CommandError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for SIGINT
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
