"""Slow and hostile connections against a real server: a header read timeout and a
connection cap (uvicorn alone holds such connections for ever)."""

import socket
import time

import httpx
import pytest

from server_process import ServerProcess

pytestmark = pytest.mark.slow  # a server subprocess


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""  # EOF: the server closed it
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_half_sent_headers_are_dropped_and_connections_are_capped():
    srv = ServerProcess("--threads", "1", "--log-level", "warning", "--header-timeout-s", "1",
                        "--max-connections", "8")
    srv.wait_ready()
    try:
        host, port = "127.0.0.1", srv.port
        trickling = socket.create_connection((host, port))
        trickling.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
        silent = socket.create_connection((host, port))  # sends nothing at all
        start = time.monotonic()
        assert closed_within(trickling, 5) and closed_within(silent, 5)
        assert time.monotonic() - start < 4
        # a complete request on a kept-alive connection is not cut by the header timer
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/health").status_code == 200
            time.sleep(1.5)
            assert c.get("/health").status_code == 200
        held = [socket.create_connection((host, port)) for _ in range(12)]
        time.sleep(0.3)
        dropped = sum(closed_within(s, 0.2) for s in held)
        assert dropped >= 12 - 8  # beyond the cap of 8: closed as they open
        for s in held:
            s.close()
        time.sleep(1.5)
        assert httpx.get(f"{srv.url}/health").status_code == 200  # and it recovers
    finally:
        srv.stop()
