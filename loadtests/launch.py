"""Start and stop `stepserve serve` subprocesses for benchmarks (loopback only)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(*args: str, ready_timeout: float = 300) -> Iterator[str]:
    with server_process(*args, ready_timeout=ready_timeout) as (url, _):
        yield url


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def server_process(*args: str, ready_timeout: float = 300, python: str | None = None
                   ) -> Iterator[tuple[str, subprocess.Popen]]:
    """A server on a free loopback port; `python` runs another install's stepserve (to
    compare versions side by side)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([python or sys.executable, "-m", "stepserve.cli", "serve", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning", *args],
                            env=os.environ.copy())
    try:
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("server exited during start-up")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise TimeoutError("server not ready")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
