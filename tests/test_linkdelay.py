"""The link-delay relay (nakshatra.bench.linkdelay): bytes intact, round trip 2 * delay, pipelining kept,
closes propagated, no process left behind. Times are in seconds unless a name says ``_ms``."""

from __future__ import annotations

import os
import random
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from nakshatra.bench.linkdelay import LinkDelay, parse_hostport
from nakshatra.errors import NakError

DELAY_MS = 20.0
DELAY = DELAY_MS / 1000.0  # seconds, one way


class EchoServer:
    """A threaded TCP echo server on 127.0.0.1; half-closes a connection after its EOF and
    records each such connection by the first chunk it received (``eofs``, guarded by ``cond``)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.cond = threading.Condition()
        self.eofs: list[bytes] = []
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.stopping = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            c.settimeout(None)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._echo, args=(c,), daemon=True)
            with self.cond:
                self.conns.append(c)
                self.threads.append(t)
            t.start()

    def _echo(self, c: socket.socket) -> None:
        first = b""
        try:
            while True:
                data = c.recv(1 << 16)
                if not data:
                    break
                first = first or data
                c.sendall(data)
        except OSError:
            return
        with self.cond:
            self.eofs.append(first)
            self.cond.notify_all()
        try:
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def wait_eof(self, first: bytes, timeout: float) -> bool:
        """Wait until the connection whose first chunk was ``first`` saw EOF; False after
        ``timeout`` seconds."""
        with self.cond:
            return self.cond.wait_for(lambda: first in self.eofs, timeout)

    def close(self) -> None:
        self.stopping = True
        self.acceptor.join()
        self.sock.close()
        with self.cond:
            conns, threads = list(self.conns), list(self.threads)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(5)
        for c in conns:
            c.close()


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def relay_addr(echo: EchoServer) -> Iterator[str]:
    with LinkDelay(DELAY_MS) as link:
        yield link.relay(echo.address)


def connect(addr: str) -> socket.socket:
    s = socket.create_connection(parse_hostport(addr), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def test_bytes_intact_both_ways(relay_addr: str) -> None:
    payload = random.Random(7).randbytes(1 << 20)  # 1 MiB
    with connect(relay_addr) as s:
        errors: list[BaseException] = []

        def send() -> None:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        while chunk := s.recv(1 << 16):  # ends with the echo server's EOF, relayed
            got += chunk
        sender.join()
    assert not errors
    assert len(got) == len(payload)
    assert bytes(got) == payload


def test_round_trip_is_twice_the_delay(relay_addr: str) -> None:
    rtts = []
    with connect(relay_addr) as s:
        for i in range(10):
            msg = f"ping{i:04d}".encode()
            t0 = time.monotonic()
            s.sendall(msg)
            assert recv_exactly(s, len(msg)) == msg
            rtts.append(time.monotonic() - t0)
            time.sleep(0.002)
    assert min(rtts) >= 2 * DELAY, rtts  # never early
    assert statistics.median(rtts) < 2 * DELAY + 0.015, rtts  # loosely: a shared noisy VM


def test_pipelined_messages_keep_their_spacing(relay_addr: str) -> None:
    gap, n, size = 0.005, 5, 8
    arrivals = []
    with connect(relay_addr) as s:
        t0 = time.monotonic()
        for i in range(n):  # the last one is sent at 20 ms, before the first echo (40 ms) is due
            s.sendall(f"msg{i:05d}".encode())
            if i < n - 1:
                time.sleep(gap)
        got = b""
        while len(got) < n * size:
            chunk = s.recv(n * size - len(got))
            assert chunk
            got += chunk
            arrivals += [time.monotonic() - t0] * (len(got) // size - len(arrivals))
    assert got == b"".join(f"msg{i:05d}".encode() for i in range(n))
    assert arrivals[0] >= 2 * DELAY
    # delay is added once, not per message: all five are back after 2 * delay + 4 gaps
    assert arrivals[-1] < 2 * DELAY + n * gap + 0.020, arrivals
    assert arrivals[-1] - arrivals[0] < 2 * DELAY, arrivals  # about 4 * gap = 20 ms apart


def test_closed_client_closes_upstream(relay_addr: str, echo: EchoServer) -> None:
    s = connect(relay_addr)
    s.sendall(b"close-test")
    assert recv_exactly(s, 10) == b"close-test"
    t0 = time.monotonic()
    s.close()
    assert echo.wait_eof(b"close-test", timeout=5), "the echo server never saw EOF"
    assert time.monotonic() - t0 >= DELAY  # the FIN travels the link like data


def test_many_concurrent_connections(relay_addr: str) -> None:
    socks = [connect(relay_addr) for _ in range(20)]
    try:
        t0 = time.monotonic()
        for i, s in enumerate(socks):
            s.sendall(f"c{i:03d}".encode())
        for i, s in enumerate(socks):
            assert recv_exactly(s, 4) == f"c{i:03d}".encode()
        took = time.monotonic() - t0
        # the 20 connections are delayed side by side, not one after another (20 x 2 x DELAY =
        # 0.8 s); the bound is half of that, so a busy machine's scheduling stalls cannot fail it
        assert 2 * DELAY <= took < 10 * 2 * DELAY, took
    finally:
        for s in socks:
            s.close()


def test_unreachable_target_closes_the_client() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{free.getsockname()[1]}"  # bound, not listening: refused
        with LinkDelay(1) as link, connect(link.relay(dead)) as s:
            try:
                assert s.recv(16) == b""  # the relay closes it ...
            except ConnectionResetError:
                pass  # ... or resets it


def test_close_leaves_no_process(echo: EchoServer) -> None:
    link = LinkDelay(5)
    addrs = [link.relay(echo.address), link.relay(echo.address)]
    assert len(set(addrs)) == 2 and all(a.startswith("127.0.0.1:") for a in addrs)
    procs = list(link.procs)
    with connect(addrs[0]) as s:  # a live connection does not keep the relay alive
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
        link.close()
    assert [p.returncode for p in procs] == [0, 0]  # SIGTERM is a clean exit
    for p in procs:
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)
    assert link.procs == []


def test_errors_name_the_problem() -> None:
    with LinkDelay(1) as link, pytest.raises(NakError, match="not host:port"):
        link.relay("nonsense")
    with pytest.raises(NakError, match="negative"):
        LinkDelay(-1)
