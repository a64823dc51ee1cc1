"""`stepserve api`: a stateless HTTP front end; jobs go to workers over Redis."""

from __future__ import annotations

import argparse

from . import serve

HELP = "stateless HTTP front end of the scaled-out roles (needs --redis-url)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    serve.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return serve.run(args, role="api")
