"""``nak soak``: many concurrent sessions through a local chain, round after round, for a while.

Each round starts ``sessions`` sessions at once (one thread and one client connection set each,
ring mode), each generating ``n_tokens`` greedy tokens (end-of-generation ignored). It checks:

* every session completes with its ``n_tokens`` tokens and no error;
* with batching off (``--max-batch 1`` on the stages) every output equals the same prompt's run
  alone, token for token;
* no stage's resident memory grows more than 5% after the first round (warm-up), and no stage
  holds more open file descriptors at the end than after the first round (no leak), both counts
  taken once the stage has closed the connections its clients closed (``_settled_fds``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import procfs
from ..client.chain import Chain, SamplerParams
from ..errors import NakError
from .side_by_side import proc_status_bytes

GREEDY = SamplerParams(temp=0.0)


def _rss_bytes(pid: int) -> int:
    """VmRSS of a process, bytes (0 if gone)."""
    return proc_status_bytes(pid, "VmRSS")


def _fds(pid: int) -> int:
    """Open file descriptors of a process (0 if gone)."""
    try:
        return len(list((procfs.PROC / str(pid) / "fd").iterdir()))
    except OSError:
        return 0


_TCP_CLOSE_WAIT = "08"  # include/net/tcp_states.h, as /proc/net/tcp prints it (hex)


def _close_wait_sockets(pid: int) -> int:
    """Sockets of a process whose peer has closed and which the process has not closed yet
    (TCP CLOSE_WAIT, from /proc/PID/fd and /proc/net/tcp{,6}); 0 if the process is gone."""
    waiting: set[str] = set()
    for table in (procfs.PROC / "net" / "tcp", procfs.PROC / "net" / "tcp6"):
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == _TCP_CLOSE_WAIT:
                waiting.add(f"socket:[{cols[9]}]")
    n = 0
    try:
        for fd in (procfs.PROC / str(pid) / "fd").iterdir():
            try:
                n += os.readlink(fd) in waiting
            except OSError:
                pass
    except OSError:
        return 0
    return n


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "06": "TIME_WAIT", "07": "CLOSE",
               "08": "CLOSE_WAIT", "0A": "LISTEN"}


def _fd_targets(pid: int) -> set[str]:
    """What each open descriptor of a process refers to: a path, or ``socket:[inode] STATE`` for
    a TCP socket (empty if the process is gone)."""
    states: dict[str, str] = {}
    for table in (procfs.PROC / "net" / "tcp", procfs.PROC / "net" / "tcp6"):
        try:
            for row in table.read_text().splitlines()[1:]:
                cols = row.split()
                if len(cols) > 9:
                    states[f"socket:[{cols[9]}]"] = _TCP_STATES.get(cols[3], cols[3])
        except OSError:
            continue
    out = set()
    try:
        for fd in (procfs.PROC / str(pid) / "fd").iterdir():
            try:
                t = os.readlink(fd)
            except OSError:
                continue
            out.add(f"{fd.name} {t} {states.get(t, '')}".rstrip())
    except OSError:
        pass
    return out


def _settled_fds(pid: int, deadline_s: float = 10.0) -> int:
    """Open file descriptors of a stage once it has closed every connection its clients closed.

    A client's close reaches the stage's event loop on its next poll, so a count taken the
    moment a round ends can include a few connections the stage is about to close (the stage is
    not leaking them). Waits until none of its sockets is in CLOSE_WAIT, at most ``deadline_s``
    seconds: one that stays there that long is a connection the stage never closes, a real
    leak, and is counted."""
    end = time.monotonic() + deadline_s
    while _close_wait_sockets(pid) and time.monotonic() < end:
        time.sleep(0.01)
    return _fds(pid)


def _round(addresses: list[str], prompts: list[list[int]], n_tokens: int, timeout_s: float) -> tuple[list, list]:
    """All prompts at once, one session each; (tokens per prompt or None, errors)."""
    out: list[list[int] | None] = [None] * len(prompts)
    errors: list[str] = []
    start = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        try:
            with Chain(addresses, ring=True, timeout_s=timeout_s) as c:
                with c.session(GREEDY, n_predict=n_tokens, ignore_eog=True) as sess:
                    start.wait(timeout=timeout_s)
                    out[i] = [r["token"] for r in sess.ring(prompts[i], n_tokens)]
        except BaseException as e:  # counted, not raised: the soak reports every failure
            errors.append(f"session {i}: {e}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s * 2)
    return out, errors


def run_soak(model: Path, parts: int = 3, sessions: int = 16, n_tokens: int = 256, duration_s: float = 600.0,
             batching: bool = False, threads: int = 0, timeout_s: float = 120.0,
             status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the soak on ``model`` cut into ``parts`` local stages for ``duration_s`` seconds (at
    least two rounds). Returns ``rounds``, ``sessions_completed``, ``errors`` (messages),
    ``mismatches`` (outputs unlike their run alone; only checked with batching off),
    ``rss_growth`` and ``fd_growth`` per stage (last round against the first), ``fd_new`` per
    stage (``"FD TARGET [TCP STATE]"`` of each descriptor not open after the first round), and
    ``ok``.
    Raises NakError for bad arguments, and on a machine without Linux /proc (macOS): the leak
    checks count each stage's descriptors and CLOSE_WAIT sockets there, and without them the
    soak would pass without having checked."""
    from ..server.local import LocalStages, cached_parts

    if sessions < 1 or n_tokens < 1 or duration_s <= 0 or parts < 1:
        raise NakError("soak: --sessions, --tokens, --parts and the duration must be positive")
    if not procfs.available():
        raise NakError(procfs.needs_proc("nak soak") + ": its leak checks read each stage's open "
                       "descriptors (/proc/PID/fd, /proc/net/tcp) and resident memory (/proc/PID/status); "
                       "run it on a Linux host")
    say = status or (lambda text: None)
    slices = cached_parts(model, parts, progress=False)
    extra = [] if batching else ["--max-batch", "1"]
    with LocalStages(slices, threads=threads, ctx=n_tokens + 64, max_sessions=sessions, extra_args=extra) as ls:
        with Chain(ls.addresses) as c:
            prompts = [c.tokenize(f"Story {i}: once upon a time, in a land of {i * 7 % 13} rivers,")
                       for i in range(sessions)]
        alone: list[list[int] | None] = []
        if not batching:
            say("each prompt alone")
            for p in prompts:
                got, errs = _round(ls.addresses, [p], n_tokens, timeout_s)
                if errs:
                    raise NakError(f"soak: a session alone failed: {errs[0]}")
                alone.append(got[0])
        res: dict[str, Any] = {"sessions": sessions, "n_tokens": n_tokens, "batching": batching, "rounds": 0,
                               "sessions_completed": 0, "errors": [], "mismatches": 0}
        t_end = time.monotonic() + duration_s
        rss0 = fds0 = None
        while res["rounds"] < 2 or time.monotonic() < t_end:
            say(f"round {res['rounds'] + 1}")
            got, errs = _round(ls.addresses, prompts, n_tokens, timeout_s)
            res["rounds"] += 1
            res["errors"] += errs
            for i, toks in enumerate(got):
                if toks is not None and len(toks) == n_tokens:
                    res["sessions_completed"] += 1
                    if alone and toks != alone[i]:
                        res["mismatches"] += 1
            if rss0 is None:
                rss0 = [_rss_bytes(p) for p in ls.pids]
                fds0 = [_settled_fds(p) for p in ls.pids]
                targets0 = [_fd_targets(p) for p in ls.pids]
        rss1 = [_rss_bytes(p) for p in ls.pids]
        fds1 = [_settled_fds(p) for p in ls.pids]
        # the descriptors a stage holds now and did not after the first round (diagnosis of a leak)
        res["fd_new"] = [sorted(_fd_targets(p) - t0) for p, t0 in zip(ls.pids, targets0)]
    res["rss_growth"] = [b / a - 1 if a else 0.0 for a, b in zip(rss0, rss1)]
    res["fd_growth"] = [b - a for a, b in zip(fds0, fds1)]
    res["ok"] = (not res["errors"] and res["mismatches"] == 0
                 and res["sessions_completed"] == res["rounds"] * sessions
                 and all(g <= 0.05 for g in res["rss_growth"]) and all(g <= 0 for g in res["fd_growth"]))
    return res
