"""The processes ``nak up`` starts and ``nak down`` stops: where their state and logs live, telling a
live process from a later one with the same pid, waiting until each is ready, stopping them.

State file: ``cache_dir()/run/<sha256 of the cluster file's absolute path>[:16]/state.json``
(:func:`state_path`); each process is a dict ``{"pid", "identity", "log", "ready", "what", ...}``
as :func:`spawn` returns it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .. import procfs
from ..errors import NakError


def run_dir(cluster_path: Path | str) -> Path:
    """Where ``nak up`` keeps the state and logs of one cluster file (by its absolute path)."""
    from ..paths import cache_dir

    key = hashlib.sha256(str(Path(cluster_path).resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "run" / key


def state_path(cluster_path: Path | str) -> Path:
    """The state file of a cluster file: what ``nak up`` started from it."""
    return run_dir(cluster_path) / "state.json"


def _identity(pid: int) -> str:
    """Something that tells a process apart from a later one with the same pid: its start time
    (``/proc/<pid>/stat`` field 22 on Linux, else ``ps -o lstart``, as on macOS); empty if the
    process is gone; ``"?"`` if it runs but neither can tell its start time."""
    try:
        stat = (procfs.PROC / str(pid) / "stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return "" if fields[0] in ("Z", "X") else fields[19]
    except FileNotFoundError:
        if procfs.available():
            return ""  # /proc is there and the pid is not: gone
    except OSError:
        pass
    try:
        r = subprocess.run(["ps", "-o", "lstart=,stat=", "-p", str(pid)], capture_output=True, text=True,
                           timeout=5)
        out = r.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    if out:
        return "" if out.split()[-1].startswith("Z") else " ".join(out.split()[:-1])
    # ps printed nothing: the pid is gone, or ps itself cannot look (procps on a Linux without
    # /proc); a signal-0 probe tells which
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""
    except OSError:
        pass  # EPERM: it exists, owned by someone else
    return "?"


def alive(proc: dict) -> bool:
    """Whether a recorded process (``pid``, ``identity``) still runs, and is still the same one."""
    ident = _identity(int(proc["pid"]))
    return bool(ident) and (ident == proc.get("identity") or "?" in (ident, proc.get("identity")))


def port_in_use(host: str, port: int) -> bool:
    """Whether something on this machine listens on ``host:port``. Raises NakError if ``host`` is
    not an address of this machine."""
    for fam, _, _, _, sa in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sa)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
                raise NakError(f"cannot listen on {host}:{port} ({e.strerror}): {host} is not an address of this "
                               "machine; fix the host in the cluster file, or pass --this-host") from None
    return False


def _ready(ready_file: Path) -> dict | None:
    try:
        line = ready_file.read_text().split("\n", 1)
    except OSError:
        return None
    if len(line) < 2:  # the line is complete once its newline is there
        return None
    try:
        return json.loads(line[0])
    except ValueError:
        return None


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def _signal(proc: dict, sig: int) -> None:
    try:
        os.kill(int(proc["pid"]), sig)
    except ProcessLookupError:
        pass


def stop_processes(procs: Sequence[dict], timeout_s: float = 10.0) -> list[dict]:
    """SIGTERM every recorded process that still runs (checked by pid and start time), wait up
    to ``timeout_s`` seconds, SIGKILL those left, wait up to 5 s more. Returns each process with
    ``stopped`` = "term" | "kill" | "gone" (already not running) | "left" (still running)."""
    out = []
    live = []
    for p in procs:
        if alive(p):
            _signal(p, signal.SIGTERM)
            live.append(p)
        else:
            out.append({**p, "stopped": "gone"})
    deadline = time.monotonic() + timeout_s
    while live and time.monotonic() < deadline:
        time.sleep(0.1)
        for p in [p for p in live if not alive(p)]:
            live.remove(p)
            out.append({**p, "stopped": "term"})
    for p in live:
        _signal(p, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        for p in [p for p in live if not alive(p)]:
            live.remove(p)
            out.append({**p, "stopped": "kill"})
    out += [{**p, "stopped": "left"} for p in live]
    by_pid = {int(d["pid"]): d for d in out}
    return [by_pid[int(p["pid"])] for p in procs]  # in the order given


_DETACHED: list[subprocess.Popen] = []  # kept so that no Popen is finalised (and warns) while running


def spawn(cmd: list[str], log: Path, ready: Path) -> dict:
    """Start ``cmd`` detached from this terminal (own session, so ``nak up`` may exit and Ctrl-C
    does not reach it): stdout (the ready JSON line) to ``ready``, stderr to ``log``."""
    ready.unlink(missing_ok=True)
    with open(log, "wb") as lf, open(ready, "wb") as rf:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=rf, stderr=lf, start_new_session=True)
    _DETACHED.append(p)
    return {"pid": p.pid, "identity": _identity(p.pid) or "?", "log": str(log), "ready": str(ready),
            "cmd": shlex.join(cmd)}


def wait_ready(procs: list[dict], timeout_s: float) -> None:
    """Wait until every process has written its ready line (and record its port); raises
    NakError with the log's tail if one exits or is not ready within ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    pending = list(procs)
    while pending:
        for p in list(pending):
            info = _ready(Path(p["ready"]))
            if info is not None:
                p["port"] = int(info.get("port", p.get("port", 0)))
                pending.remove(p)
            elif not alive(p):
                raise NakError(f"{p['what']} exited while starting (log {p['log']}):\n{_tail(Path(p['log']))}")
        if pending and time.monotonic() > deadline:
            p = pending[0]
            raise NakError(f"{p['what']} was not ready after {timeout_s:.0f} s (log {p['log']}):\n"
                           f"{_tail(Path(p['log']))}")
        if pending:
            time.sleep(0.1)


