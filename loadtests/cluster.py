"""`stepserve api` and `stepserve worker` subprocesses on one machine, for the
scale-out benchmarks and fault tests. Logs go to files (a full pipe would stall a
process that logs while Redis is down)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .launch import free_port


class Cluster:
    def __init__(self, redis_url: str, worker_args: tuple[str, ...] = (),
                 api_args: tuple[str, ...] = ()) -> None:
        self.redis_url = redis_url
        self.worker_args, self.api_args = worker_args, api_args
        self.logs = Path(tempfile.mkdtemp(prefix="stepserve-cluster-"))
        self.workers: list[subprocess.Popen] = []
        self.api: subprocess.Popen | None = None
        self.url = ""

    def _spawn(self, role: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{role}-{len(self.workers)}-{time.time_ns()}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "stepserve.cli", role, "--redis-url",
                                 self.redis_url, "--log-level", "warning", *args],
                                stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())

    def add_worker(self) -> subprocess.Popen:
        proc = self._spawn("worker", "--metrics-port", "0", *self.worker_args)
        self.workers.append(proc)
        return proc

    def start_api(self, ready_timeout: float = 300) -> str:
        port = free_port()
        self.api = self._spawn("api", "--host", "127.0.0.1", "--port", str(port),
                               *self.api_args)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:  # ready once a worker has announced its models
            if self.api.poll() is not None:
                raise RuntimeError(f"the api exited during start-up; logs in {self.logs}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self.url
            time.sleep(0.3)
        raise TimeoutError(f"the api did not become ready; logs in {self.logs}")

    def consumer(self, proc: subprocess.Popen) -> str:
        """The worker's consumer name in the stream group (host-pid)."""
        import socket

        return f"{socket.gethostname()}-{proc.pid}"

    def stop(self) -> None:
        for proc in [*self.workers, self.api]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers, self.api]:
            if proc is None:
                continue
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
