"""A real `redis-server` on a loopback port, for the scale-out tests and benchmarks:
started, killed (-9) and restarted on the same port and data folder."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time

import redis

from .launch import free_port


class RedisServer:
    """With `fsync` "always" (an append-only file synced on every write) a killed server
    comes back with all its streams and jobs; "everysec" is Redis' usual production
    setting (up to a second lost in a crash); "off" keeps nothing."""

    def __init__(self, fsync: str = "always", port: int | None = None) -> None:
        if fsync not in ("always", "everysec", "off"):
            raise ValueError(f"fsync must be always, everysec or off, not {fsync!r}")
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.fsync = fsync
        self.dir = tempfile.mkdtemp(prefix="stepserve-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        aof = (["--appendonly", "no"] if self.fsync == "off" else
               ["--appendonly", "yes", "--appendfsync", self.fsync])
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir,
             "--save", "", *aof], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """Crash it (SIGKILL): no goodbye to the clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
