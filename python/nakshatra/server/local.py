"""Start stages as local processes (``nak run`` without ``--chain``, tests, benchmarks).

Each stage is ``python -m nakshatra.server.serve SLICE --port 0 --ready-json`` on 127.0.0.1; its first
line on stdout says which port it got. Its log goes to a file, shown when it fails to start.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ChainError
from ..subprocesses import stop_all
from .options import DEFAULTS


def _die_with_parent():
    """A preexec_fn that makes a stage get SIGTERM when the process that started it dies, even by
    SIGKILL (Linux prctl PR_SET_PDEATHSIG), so no stage outlives its `nak run` / `nak api`. The
    signal follows the starting *thread*, so only stages started from the main thread get it."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return arm


def _chain_preexec(*fns: Callable[[], None] | None) -> Callable[[], None] | None:
    """One preexec_fn running each of ``fns`` (None ones left out) in order; None if none."""
    todo = [f for f in fns if f is not None]
    if not todo:
        return None

    def run() -> None:
        for f in todo:
            f()

    return run


class LocalStages:
    """A context manager running one stage process per slice; ``addresses`` lists ``host:port``.

    ``threads`` is llama.cpp threads per stage (decode and prefill); 0 gives every stage all the
    cores, and with ``cpu_lock`` the stages take turns around each llama_decode (``--cpu-lock``)
    so that no two spin in ggml's barriers on the same cores. One session keeps one stage busy at
    a time, so turn-taking costs it nothing (2-core VM, SmolLM2, 3 stages: ~100 tok/s decode with
    2 threads each and the lock, ~62 with 1 thread each, 13 for 4 sessions with 2 threads and no
    lock).
    Raises ChainError, with the stage's log tail, when a stage exits or is not ready within
    ``start_timeout_s``. ``key_file``: a cluster key (``nak keygen``) every stage is started with;
    clients then need ``Chain(..., key=load_key(key_file))``. ``hosts[i]``: the address stage ``i``
    listens on (default 127.0.0.1; a non-loopback one needs ``key_file``); ``wrap[i]``: a command
    prefix it runs under, e.g. ``["ip", "netns", "exec", NAME]`` for a stage on an emulated host;
    ``preexec[i]``: a function the child runs before it starts the stage, e.g.
    :meth:`nakshatra.bench.hostemu.MemoryLimit.preexec` to start it inside a memory limit.
    """

    def __init__(self, slices: Sequence[Path], threads: int = 0, ctx: int = DEFAULTS.ctx,
                 max_sessions: int = DEFAULTS.max_sessions, extra_args: Sequence[str] = (), start_timeout_s: float = 120.0,
                 env: dict[str, str] | None = None, stage_args: Sequence[Sequence[str]] = (),
                 cpu_lock: bool = True, key_file: str | Path | None = None,
                 hosts: Sequence[str] = (), wrap: Sequence[Sequence[str]] = (),
                 preexec: Sequence[Callable[[], None] | None] = ()) -> None:
        self.slices = [Path(s) for s in slices]
        # per stage: the address it listens on (127.0.0.1 when not given) and a command prefix
        # it runs under (e.g. ``ip netns exec NAME``: a stage on an emulated host)
        self.hosts = [hosts[i] if i < len(hosts) else "127.0.0.1" for i in range(len(self.slices))]
        self.wrap = [list(wrap[i]) if i < len(wrap) else [] for i in range(len(self.slices))]
        self.preexec = [preexec[i] if i < len(preexec) else None for i in range(len(self.slices))]
        # every stage decodes with every core, and the stages take turns (--cpu-lock): one
        # session keeps one stage busy at a time, and stages that spin in ggml's barriers at the
        # same time on shared cores collapse (2-core VM, 3 stages x 2 threads, 4 sessions: 13
        # tok/s without the lock)
        self.threads = threads or (os.cpu_count() or 1)
        self.threads_batch = self.threads
        self.ctx = ctx
        self.max_sessions = max_sessions
        self.extra_args = list(extra_args)
        self.stage_args = [list(a) for a in stage_args]  # per stage, after extra_args
        self.cpu_lock = cpu_lock
        self.key_file = str(key_file) if key_file else ""  # cluster key every stage holds
        self.start_timeout_s = start_timeout_s
        self.env = env
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []
        self.pids: list[int] = []
        self._logdir = tempfile.TemporaryDirectory(prefix="nak-stages-")
        self.logs: list[Path] = []

    def __enter__(self) -> LocalStages:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.env or {})
        for i, path in enumerate(self.slices):
            log = Path(self._logdir.name) / f"stage{i}.log"
            self.logs.append(log)
            cmd = [*self.wrap[i], sys.executable, "-m", "nakshatra.server.serve", str(path), "--host", self.hosts[i],
                   "--port", "0", "--ready-json", "--threads", str(self.threads),
                   "--threads-batch", str(self.threads_batch), "--ctx", str(self.ctx),
                   "--max-sessions", str(self.max_sessions),
                   *(["--cpu-lock", str(Path(self._logdir.name) / "cpu.lock")] if self.cpu_lock else []),
                   *(["--key-file", self.key_file] if self.key_file else []),
                   *self.extra_args,
                   *(self.stage_args[i] if i < len(self.stage_args) else [])]
            with open(log, "wb") as lf:
                p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=lf, stdin=subprocess.DEVNULL, env=env,
                                     preexec_fn=_chain_preexec(_die_with_parent(), self.preexec[i]))
            self.procs.append(p)
        for i, p in enumerate(self.procs):
            info = self._wait_ready(i, p)
            host = self.hosts[i]
            self.addresses.append(f"[{host}]:{info['port']}" if ":" in host else f"{host}:{info['port']}")
            self.pids.append(p.pid)

    def _wait_ready(self, i: int, p: subprocess.Popen) -> dict:
        deadline = time.monotonic() + self.start_timeout_s
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if sel.select(timeout=0.2):
                    line = p.stdout.readline()
                    if line.startswith(b"{"):
                        return json.loads(line)
                    # anything else on stdout is not the ready line: llama.cpp's abort handler
                    # prints a debugger's backtrace there before the process dies
                if p.poll() is not None:
                    break
        finally:
            sel.close()
        tail = self.logs[i].read_text(errors="replace")[-2000:] if self.logs[i].exists() else ""
        what = "exited" if p.poll() is not None else f"was not ready after {self.start_timeout_s:.0f} s"
        raise ChainError(f"local stage {i} ({self.slices[i].name}) {what}:\n{tail.strip()}")

    def stop(self) -> None:
        """SIGTERM every stage, wait up to 10 s, then SIGKILL."""
        stop_all(self.procs, 10)
        self.procs = []
        self._logdir.cleanup()


def cached_parts(model_path: Path, n_parts: int, progress: bool = True) -> list[Path]:
    """Slices of ``model_path`` cut into ``n_parts`` (planned by bytes), cut once into
    ``cache_dir()/slices/<sha256[:16]>/parts-<n>/`` and reused while the manifest's files are
    there with their recorded sizes. ``model_path``: a GGUF file or any shard of a split model
    (keyed by the model's identity, :func:`nakshatra.gguf.shards.model_sha256`). Raises RangeError /
    SliceError as :func:`slice_model`."""
    from ..gguf.manifest import Manifest
    from ..gguf.shards import open_model
    from ..gguf.slicer import _known_sha256, slice_model
    from ..paths import cache_dir

    model_path = Path(model_path).absolute()  # not resolved: a shard's siblings are found by name
    model = open_model(model_path)
    root = cache_dir() / "slices"
    root.mkdir(parents=True, exist_ok=True)
    sha = _known_sha256(model, root / "index.json", progress)
    out = root / sha[:16] / f"parts-{n_parts}"
    manifest_path = out / f"{model.stem}.manifest.json"
    if manifest_path.exists():
        try:
            m = Manifest.load(manifest_path)
            paths = [out / s.file for s in m.slices]
            if m.model["sha256"] == sha and all(p.is_file() and p.stat().st_size == s.bytes
                                                for p, s in zip(paths, m.slices)):
                return paths
        except Exception:  # a damaged cache entry is simply cut again
            pass
    m = slice_model(model_path, n_parts=n_parts, out_dir=out, progress=progress)
    return [out / s.file for s in m.slices]
