"""Start and stop `stepserve serve` subprocesses for benchmarks (loopback only)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 300, alive: Callable[[], bool] | None = None
               ) -> float:
    """Seconds until `url`/ready answers 200; `alive` says whether the server is still
    running (else it failed to start)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if alive is not None and not alive():
            raise RuntimeError("server exited during start-up")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready in {timeout:g} s")


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
        wait_ready(url, ready_timeout, lambda: proc.poll() is None)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
