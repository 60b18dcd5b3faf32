"""A userspace link-delay relay: emulate a slow network link between two local processes.

The kernel here has no ``netem``, so a link's propagation delay is emulated by a relay process::

    python -m nakshatra.bench.linkdelay --listen 127.0.0.1:0 --to 127.0.0.1:7071 --delay-ms 10 --ready-json

It accepts TCP connections on ``--listen``; for each it opens a connection to ``--to`` and copies
bytes both ways, delivering every chunk ``--delay-ms`` milliseconds after it arrived (a one-way
delay, measured from each chunk's arrival, so a stream of chunks arriving 1 ms apart leaves 1 ms
apart, each ``delay`` late; order is preserved; there is no bandwidth cap). A round trip through
the relay therefore costs ``2 * delay`` more than a direct one. ``TCP_NODELAY`` is set on both
sockets. An end of stream (FIN) is forwarded like data, ``delay`` after it arrived, as a
half-close; once both directions have ended, or one side is gone (reset) and what was pending for
the other side has been flushed, both connections are closed. The TCP handshake is not delayed
(``connect()`` to the relay returns at once; the first bytes take ``delay``).

With ``--ready-json`` the relay prints one JSON line ``{"listen": "127.0.0.1:PORT"}`` on stdout
once it listens (port 0 picks a free port); it serves until SIGTERM or SIGINT and exits with 0.

Timing: one asyncio event loop per process, a FIFO per direction, and one timer per direction
armed for the head chunk's due time (``arrival + delay``, in :func:`time.monotonic` seconds).
Two things make plain asyncio timers late: ``epoll_wait`` takes whole milliseconds and
:class:`selectors.EpollSelector` rounds up twice (up to 2 ms late), which
:class:`FineEpollSelector` fixes; and waking a sleeping process takes 100 to 250 µs on a VM. So
the timer is armed ``spin`` earlier (``--spin-us``, 300 µs by default) and the last stretch is a
busy wait that keeps serving I/O (``call_soon`` rounds with a zero-timeout poll): deliveries are
then late by a few microseconds (median; ``--stats`` prints it on exit), for up to ``spin`` of CPU
per delivery. ``--spin-us 0`` turns the busy wait off.

:class:`LinkDelay` starts such relays as subprocesses (tests, benchmarks)::

    with LinkDelay(delay_ms=10) as link:
        addr = link.relay("127.0.0.1:7071")   # connect here instead: every byte 10 ms later
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import NakError
from ..subprocesses import stop_all

#: Default busy-wait window before a chunk is due, in microseconds (see the module docstring).
DEFAULT_SPIN_US = 300.0
#: A direction stops reading its source while more than this many bytes wait in its FIFO ...
HIGH_WATER = 16 << 20
#: ... and reads again once fewer than this many wait.
LOW_WATER = 4 << 20


def parse_hostport(text: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) -> ``(host, port)``; raises NakError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise NakError(f"address {text!r} is not host:port (e.g. 127.0.0.1:7071)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


# --------------------------------------------------------------------------------------------
# the relay (runs in the relay process)


class _Direction:
    """One direction of one relayed connection: a FIFO of ``(due, chunk)``, ``due`` in loop
    seconds (``arrival + delay``); ``chunk`` None stands for the end of stream."""

    __slots__ = ("conn", "delay", "done", "dst", "dst_paused", "eof_in", "fifo", "loop", "queued",
                 "spin", "src", "src_paused", "timer")

    def __init__(self, conn: _Conn, delay: float, spin: float) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.delay = delay
        self.spin = spin
        self.src: _Side | None = None
        self.dst: _Side | None = None
        self.fifo: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0  # bytes in the FIFO
        self.timer: asyncio.Handle | None = None
        self.eof_in = False  # the end of stream is in the FIFO
        self.done = False  # delivered the end of stream, or the destination is gone
        self.dst_paused = False  # the destination's transport asked us to stop writing
        self.src_paused = False

    def push(self, chunk: bytes | None) -> None:
        """Queue ``chunk`` (None: end of stream), due ``delay`` after now."""
        if self.done or self.eof_in:
            return
        self.fifo.append((self.loop.time() + self.delay, chunk))
        if chunk is None:
            self.eof_in = True
        else:
            self.queued += len(chunk)
            self._flow()
        if self.timer is None:
            self._arm()

    def _arm(self) -> None:
        if not self.fifo or self.dst is None or self.dst.transport is None:
            return
        wait = self.fifo[0][0] - self.loop.time()
        if wait > self.spin:
            self.timer = self.loop.call_at(self.fifo[0][0] - self.spin, self._fire)
        else:  # due now, or within the busy-wait window: poll again on the next loop round
            self.timer = self.loop.call_soon(self._fire)

    def _fire(self) -> None:
        self.timer = None
        if self.done:
            return
        now = self.loop.time()
        out: list[bytes] = []
        eof = False
        fifo = self.fifo
        fifo_due = fifo[0][0] if fifo else now
        while fifo and fifo[0][0] <= now:
            chunk = fifo.popleft()[1]
            if chunk is None:
                eof = True
                break
            out.append(chunk)
        dst = self.dst
        assert dst is not None and dst.transport is not None
        if out:
            if self.conn.relay.stats is not None:
                self.conn.relay.stats.append(self.loop.time() - fifo_due)
            n = sum(map(len, out))
            self.queued -= n
            dst.transport.write(out[0] if len(out) == 1 else b"".join(out))
            self._flow()
        if eof:
            self.done = True
            self.conn.direction_done(self)
        elif fifo:
            self._arm()

    def _flow(self) -> None:
        """Pause or resume reading the source (FIFO size and the destination's backpressure)."""
        src = self.src
        if src is None or src.transport is None:
            return
        want_pause = self.dst_paused or self.queued > HIGH_WATER
        if want_pause and not self.src_paused:
            self.src_paused = True
            src.transport.pause_reading()
        elif self.src_paused and not self.dst_paused and self.queued < LOW_WATER:
            self.src_paused = False
            src.transport.resume_reading()

    def drop(self) -> None:
        """The destination is gone: forget what is pending."""
        self.done = True
        self.fifo.clear()
        self.queued = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Side(asyncio.Protocol):
    """One socket of a relayed connection (the accepted client, or the one to the target)."""

    def __init__(self, conn: _Conn, name: str) -> None:
        self.conn = conn
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.inbound: _Direction | None = None  # data read here goes this way
        self.outbound: _Direction | None = None  # data written here comes this way
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.inbound is not None:
            self.inbound.push(data)

    def eof_received(self) -> bool:
        if self.inbound is not None:
            self.inbound.push(None)
        return True  # keep the socket open for what still comes the other way

    def pause_writing(self) -> None:
        if self.outbound is not None:
            self.outbound.dst_paused = True
            self.outbound._flow()

    def resume_writing(self) -> None:
        if self.outbound is not None:
            self.outbound.dst_paused = False
            self.outbound._flow()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.side_lost(self)


class _Conn:
    """One relayed connection: client side, target side, and a :class:`_Direction` each way."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.client = _Side(self, "client")
        self.target = _Side(self, "target")
        self.up = _Direction(self, relay.delay, relay.spin)  # client -> target
        self.down = _Direction(self, relay.delay, relay.spin)  # target -> client
        self.up.src, self.up.dst = self.client, self.target
        self.down.src, self.down.dst = self.target, self.client
        self.client.inbound, self.client.outbound = self.up, self.down
        self.target.inbound, self.target.outbound = self.down, self.up
        self.connect_task: asyncio.Task | None = None
        self.closed = False

    def start(self) -> None:
        self.connect_task = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        host, port = self.relay.target
        try:
            await self.loop.create_connection(lambda: self.target, host, port)
        except OSError as e:
            print(f"linkdelay: cannot connect to {host}:{port}: {e}", file=sys.stderr, flush=True)
            self.close(abort=True)
            return
        if self.closed:  # shut down while connecting
            self.close(abort=True)
            return
        if self.up.timer is None:
            self.up._arm()  # what the client sent meanwhile is due already or soon
        self.down._flow()

    def direction_done(self, d: _Direction) -> None:
        """``d`` delivered its end of stream: half-close its destination, or close both."""
        other = self.down if d is self.up else self.up
        dst = d.dst
        assert dst is not None and dst.transport is not None
        if other.done or dst.lost or not dst.transport.can_write_eof():
            self.close()
        else:
            dst.transport.write_eof()

    def side_lost(self, side: _Side) -> None:
        """``side`` is gone: drop what was pending for it; the other way flushes, then ends."""
        side.outbound.drop()  # type: ignore[union-attr]
        inbound = side.inbound
        assert inbound is not None
        if inbound.done:
            self.close()
        else:
            inbound.push(None)  # after what is pending, end (close) the other side too

    def close(self, abort: bool = False) -> None:
        """Close both sockets (``close`` flushes their write buffers; ``abort`` does not)."""
        self.closed = True
        for d in (self.up, self.down):
            d.drop()
        for s in (self.client, self.target):
            if s.transport is not None and not s.transport.is_closing():
                s.transport.abort() if abort else s.transport.close()
        self.relay.conns.discard(self)


class Relay:
    """The relay in one process: ``serve()`` listens on ``listen`` and relays to ``target``,
    each chunk ``delay_ms`` milliseconds late (``spin_us``: busy-wait window, microseconds)."""

    def __init__(self, listen: str, target: str, delay_ms: float,
                 spin_us: float = DEFAULT_SPIN_US, stats: bool = False) -> None:
        if delay_ms < 0:
            raise NakError(f"--delay-ms {delay_ms} is negative; give 0 or more milliseconds")
        self.listen = parse_hostport(listen)
        self.target = parse_hostport(target)
        self.delay = delay_ms / 1000.0  # seconds
        self.spin = max(spin_us, 0.0) / 1e6  # seconds
        self.conns: set[_Conn] = set()
        #: with ``stats``: how late (seconds) each delivery was, the last 100000 of them
        self.stats: collections.deque[float] | None = collections.deque(maxlen=100000) if stats else None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    def _accept(self) -> _Side:
        conn = _Conn(self)
        self.conns.add(conn)
        conn.start()
        return conn.client

    async def serve(self, ready_json: bool = False) -> None:
        """Serve until SIGTERM or SIGINT; print the ready line first when ``ready_json``."""
        self.loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)
        server = await self.loop.create_server(self._accept, self.listen[0], self.listen[1])
        host, port = server.sockets[0].getsockname()[:2]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if ready_json:
            print(json.dumps({"listen": where}), flush=True)
        print(f"linkdelay: {where} -> {self.target[0]}:{self.target[1]}, "
              f"{self.delay * 1000:g} ms each way", file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            server.close()
            for conn in list(self.conns):
                if conn.connect_task is not None:
                    conn.connect_task.cancel()
                conn.close(abort=True)
            await server.wait_closed()
            await asyncio.sleep(0)  # let the aborted transports call connection_lost
            if self.stats:
                late = sorted(self.stats)
                print(f"linkdelay: {len(late)} deliveries late by median {late[len(late) // 2] * 1e6:.0f} us, "
                      f"p90 {late[len(late) * 9 // 10] * 1e6:.0f} us, max {late[-1] * 1e6:.0f} us",
                      file=sys.stderr, flush=True)


if hasattr(selectors, "EpollSelector"):

    class FineEpollSelector(selectors.EpollSelector):
        """An epoll selector that waits with microsecond rather than millisecond resolution.

        ``epoll_wait`` takes whole milliseconds and :class:`selectors.EpollSelector` rounds a
        timeout up twice (``ceil(8.45 ms) * 1e-3`` is a hair over 9 ms and is rounded up again),
        so asyncio timers fire up to 2 ms late. Here a timed wait is a ``select()`` (microseconds)
        on the epoll descriptor itself, which becomes readable when any registered file is ready;
        then a zero-timeout ``epoll_wait`` collects the events."""

        def select(self, timeout: float | None = None) -> list:
            if timeout is not None and timeout > 0:
                select.select([self._selector.fileno()], [], [], timeout)  # type: ignore[attr-defined]
                timeout = 0
            return super().select(timeout)

    def _new_loop() -> asyncio.AbstractEventLoop:
        return asyncio.SelectorEventLoop(FineEpollSelector())

else:  # pragma: no cover - not Linux

    def _new_loop() -> asyncio.AbstractEventLoop:
        return asyncio.new_event_loop()


def _less_timer_slack() -> None:
    """Ask Linux for 1 µs timer slack instead of 50 µs (prctl PR_SET_TIMERSLACK); best effort."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, nanoseconds
    except Exception:  # noqa: BLE001, S110 - only an accuracy tweak
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m nakshatra.bench.linkdelay``; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m nakshatra.bench.linkdelay",
                                 description="Relay TCP connections, each byte DELAY ms late.")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on (port 0: any)")
    ap.add_argument("--to", required=True, help="host:port to relay to")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay, milliseconds")
    ap.add_argument("--spin-us", type=float, default=DEFAULT_SPIN_US,
                    help="busy-wait this many microseconds before a chunk is due (0: timers only)")
    ap.add_argument("--stats", action="store_true",
                    help="on exit, print how late deliveries were (median, p90, max) on stderr")
    ap.add_argument("--ready-json", action="store_true",
                    help='print {"listen": "HOST:PORT"} on stdout once listening')
    args = ap.parse_args(argv)
    try:
        relay = Relay(args.listen, args.to, args.delay_ms, args.spin_us, args.stats)
    except NakError as e:
        print(f"linkdelay: {e}", file=sys.stderr)
        return 2
    _less_timer_slack()
    loop = _new_loop()
    try:
        loop.run_until_complete(relay.serve(ready_json=args.ready_json))
    except OSError as e:
        print(f"linkdelay: cannot listen on {args.listen}: {e}", file=sys.stderr)
        return 1
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
    return 0


# --------------------------------------------------------------------------------------------
# the API (starts relay processes)


class LinkDelay:
    """A context manager that starts relay processes, each adding ``delay_ms`` milliseconds one
    way (``2 * delay_ms`` per round trip) in front of one target.

    ``relay(target)`` returns the address to use instead of ``target``; ``close()`` (or leaving
    the ``with`` block) terminates all of them and waits. Raises NakError, with the relay's stderr
    tail, when a relay exits or does not say it listens within ``start_timeout_s`` seconds.
    """

    def __init__(self, delay_ms: float, start_timeout_s: float = 10.0,
                 spin_us: float = DEFAULT_SPIN_US) -> None:
        if delay_ms < 0:
            raise NakError(f"LinkDelay delay_ms={delay_ms} is negative; give 0 or more milliseconds")
        self.delay_ms = float(delay_ms)
        self.start_timeout_s = start_timeout_s
        self.spin_us = spin_us
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []
        self._logdir: tempfile.TemporaryDirectory | None = None
        self._logs: list[Path] = []

    def __enter__(self) -> LinkDelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _child_env() -> dict[str, str]:
        """This process's environment, plus the package's parent directory on PYTHONPATH unless
        it is there already or is a site-packages directory (an installed package)."""
        import site

        env = dict(os.environ)
        parent = str(Path(__file__).resolve().parents[2])  # holds nakshatra/
        entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        known = {str(Path(p).resolve()) for p in entries}
        sites = set(getattr(site, "getsitepackages", list)()) | {site.getusersitepackages()}
        if parent not in known and parent not in {str(Path(p).resolve()) for p in sites}:
            env["PYTHONPATH"] = os.pathsep.join([parent, *entries])
        return env

    def relay(self, target: str) -> str:
        """Start one relay in front of ``target`` (``"host:port"``); returns ``"127.0.0.1:PORT"``."""
        parse_hostport(target)  # fail here, not in the child, on a malformed address
        if self._logdir is None:
            self._logdir = tempfile.TemporaryDirectory(prefix="nak-linkdelay-")
        log = Path(self._logdir.name) / f"relay{len(self._logs)}.log"
        self._logs.append(log)
        cmd = [sys.executable, "-m", "nakshatra.bench.linkdelay", "--listen", "127.0.0.1:0",
               "--to", target, "--delay-ms", repr(self.delay_ms), "--spin-us", repr(self.spin_us),
               "--ready-json"]
        with open(log, "wb") as lf:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=lf, stdin=subprocess.DEVNULL,
                                 env=self._child_env())
        self.procs.append(p)
        addr = self._wait_ready(p, log, target)
        self.addresses.append(addr)
        return addr

    def _wait_ready(self, p: subprocess.Popen, log: Path, target: str) -> str:
        assert p.stdout is not None
        deadline = time.monotonic() + self.start_timeout_s
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=0.1):
                    line = p.stdout.readline()
                    break
                if p.poll() is not None:
                    break
        if line:
            try:
                return str(json.loads(line)["listen"])
            except (ValueError, KeyError, TypeError):
                pass
        tail = log.read_text(errors="replace")[-2000:].strip() if log.exists() else ""
        if p.poll() is not None:
            what = f"exited with code {p.returncode}"
        elif line:
            what = f"printed {line[:200]!r} instead of its ready line"
        else:
            what = f"did not start in {self.start_timeout_s:g} s"
        raise NakError(f"link-delay relay to {target} {what}:\n{tail}")

    def close(self) -> None:
        """SIGTERM every relay, wait up to 5 s each (then SIGKILL), and remove their logs."""
        stop_all(self.procs, 5.0)
        self.procs = []
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None
        self._logs = []


if __name__ == "__main__":
    sys.exit(main())
