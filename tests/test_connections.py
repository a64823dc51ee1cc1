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


def test_a_trickled_body_is_cut_off_at_its_deadline():
    srv = ServerProcess("--threads", "1", "--log-level", "warning", "--body-timeout-s", "1",
                        "--max-body-mb", "0.001")
    srv.wait_ready()
    try:
        def trickle(length: int) -> tuple[bytes, float]:
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\n"
                      + f"Content-Length: {length}\r\n\r\n".encode())
            start, reply = time.monotonic(), b""
            s.settimeout(0.2)
            while time.monotonic() - start < 8:
                try:
                    s.sendall(b"x")  # a byte at a time must not keep it open
                except OSError:
                    break
                try:
                    data = s.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                reply += data
            s.close()
            return reply, time.monotonic() - start

        small, t_small = trickle(500)  # under the size limit: the body deadline ends it
        big, t_big = trickle(100_000)  # over it: 413 at once, then the connection closes
        assert t_small < 5 and b" 408 " in small.split(b"\r\n")[0], small[:80]
        assert t_big < 5 and b" 413 " in big.split(b"\r\n")[0], big[:80]
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        srv.stop()
