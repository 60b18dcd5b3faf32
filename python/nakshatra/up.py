"""``nak up`` / ``nak down``: run the stages of a cluster file that belong on this host, hand the
slices to the other hosts over HTTP, and fetch a slice (``nak serve --fetch``).

``nak up cluster.toml`` (see :func:`up`):

1. makes the slices the cluster file names, in its ``slices_dir``, if any is missing (one
   :func:`nakshatra.slicer.slice_model` pass over the model; a ``<stem>.manifest.json`` records each
   slice's sha256);
2. starts, as detached processes (``python -m nakshatra.serve SLICE ... --ready-json``), every
   stage and replica whose host is this machine, and waits until each is ready;
3. if some stage runs elsewhere, starts a read-only HTTP server for the slice files the cluster
   file names (``--files-port``, 7070 by default; nothing else is reachable through it, and with a
   cluster key every download must carry a MAC of the file name under the key, see
   :func:`fetch_token`), and prints, for each other host, the exact ``nak serve`` command to run
   there: it fetches the slice from that server if missing, checks its sha256 and serves.

What it started (pids, ports, logs) is recorded in a state file,
``cache_dir()/run/<sha256 of the cluster file's absolute path>[:16]/state.json``; ``nak down`` stops
exactly those processes (SIGTERM, then SIGKILL after a timeout) and removes the state.

``python -m nakshatra.up files --dir D --port P NAME ...`` is the slice file server on its own.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import hmac
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from . import procfs
from .cluster import ClusterFile
from .errors import NakError, SliceError
from .manifest import CHUNK, Manifest, SliceInfo, sha256_file, write_atomic
from .ranges import LayerRange

DEFAULT_FILES_PORT = 7070
"""TCP port of the slice file server ``nak up`` starts when some stage runs on another host."""

AUTH_HEADER = "X-Nak-Fetch-Auth"
"""HTTP header carrying :func:`fetch_token` when the cluster has a key."""

SERVE_FLAGS = {
    "ctx": "--ctx", "max_sessions": "--max-sessions", "threads": "--threads",
    "threads_batch": "--threads-batch", "n_gpu_layers": "--n-gpu-layers", "flash_attn": "--flash-attn",
    "cache_type_k": "--cache-type-k", "cache_type_v": "--cache-type-v", "max_batch": "--max-batch",
    "wire": "--wire", "batch_hold_ms": "--batch-hold-ms", "poll": "--poll", "idle_timeout": "--idle-timeout",
    "max_frame_mb": "--max-frame-mb",
}
"""Cluster file ``[options]`` passed to every stage, and the ``nak serve`` flag of each."""

CLIENT_OPTIONS = ("mode", "timeout")
"""Cluster file ``[options]`` meant for clients (``nak run``), not for stages."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ---- which stages run here -----------------------------------------------------------------------

def _resolved(host: str) -> set[str]:
    """The IP addresses ``host`` resolves to (empty if it does not resolve)."""
    try:
        return {str(ai[4][0]).split("%")[0] for ai in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return set()


def _bindable(ip: str) -> bool:
    """Whether a socket can bind ``ip`` on this machine, i.e. it is one of this machine's
    addresses (any 127.x.y.z is, on Linux)."""
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


def is_this_host(host: str, this_hosts: Sequence[str] = ()) -> bool:
    """Whether stage address ``host`` is this machine.

    With ``this_hosts`` (``nak up --this-host``): exactly when ``host`` is one of them or resolves
    to one of their addresses. Without: when it is ``localhost``, this machine's host name, or
    every address it resolves to can be bound here (loopback and this machine's own IPs).
    """
    if this_hosts:
        if host in this_hosts:
            return True
        mine = set().union(*(_resolved(h) for h in this_hosts))
        return bool(_resolved(host) & mine)
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    ips = _resolved(host)
    return bool(ips) and all(_bindable(ip) for ip in ips)


def _route_address(remote_host: str) -> str:
    """The address of this machine that packets to ``remote_host`` leave from (what that host
    can reach us at); this machine's host name if there is no route."""
    for ip in sorted(_resolved(remote_host)):
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.connect((ip, 9))  # UDP: no packet is sent, the kernel only picks a route
                return str(s.getsockname()[0])
        except OSError:
            continue
    return socket.gethostname()


def _parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NakError(f"replica address {text!r} is not host:port (e.g. 10.0.0.7:7071)")
    return host.strip("[]"), int(port)


@dataclass
class Instance:
    """One stage process of the cluster: a stage of the file or one of its replicas. ``slice``
    is the slice's file name (in the cluster's slices_dir); ``local``: it runs on this host."""

    host: str
    port: int
    layers: LayerRange
    slice: str
    local: bool
    replica_of: str = ""

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def slice_names(cf: ClusterFile) -> list[str]:
    """The slice file name of each stage: its ``slice``, else ``<model stem>.<a-b>.gguf`` (the
    name ``nak slice`` gives it)."""
    stem = Path(cf.model).stem
    return [s.slice or f"{stem}.{s.layers.inclusive()}.gguf" for s in cf.stages]


def plan_instances(cf: ClusterFile, this_hosts: Sequence[str] = ()) -> list[Instance]:
    """Every stage and replica of ``cf`` in layer order, each marked local or not. Raises
    NakError for an address listed twice or a slice name that is a path."""
    out: list[Instance] = []
    seen: set[tuple[str, int]] = set()
    for spec, name in zip(cf.stages, slice_names(cf)):
        if Path(name).name != name or name in ("", ".", ".."):
            raise NakError(f"{cf.path}: stage {spec.address}: slice {name!r} must be a file name in slices_dir, "
                           "not a path; set slices_dir for the folder")
        addrs = [(spec.host, spec.port, "")] + [(*_parse_address(r), spec.address) for r in spec.replicas]
        for host, port, primary in addrs:
            if (host, port) in seen:
                raise NakError(f"{cf.path}: {host}:{port} is listed twice; give every stage and replica its own "
                               "host:port")
            seen.add((host, port))
            out.append(Instance(host, port, spec.layers, name, is_this_host(host, this_hosts), primary))
    return out


# ---- slices ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SliceFile:
    """A slice ready to serve: its path, whole-file ``sha256`` (hex) and size in ``bytes``."""

    path: Path
    sha256: str
    bytes: int


def _listed(slices_dir: Path) -> dict[str, SliceInfo]:
    """Slices recorded by the manifests in ``slices_dir``, by file name."""
    out: dict[str, SliceInfo] = {}
    for mpath in sorted(slices_dir.glob("*.manifest.json")):
        try:
            m = Manifest.load(mpath)
        except SliceError:
            continue
        for s in m.slices:
            out.setdefault(s.file, s)
    return out


def _model_path(cf: ClusterFile, progress: bool) -> Path:
    from .hub import is_ref
    from .models import BUILTIN, resolve_model

    if is_ref(cf.model):
        return resolve_model(cf.model, progress=progress)
    p = cf.resolve(cf.model)
    if not p.is_file() and cf.model in BUILTIN:
        return resolve_model(cf.model, progress=progress)
    return resolve_model(p, progress=progress)


def ensure_slices(cf: ClusterFile, progress: bool = False,
                  echo: Callable[[str], None] = lambda s: None) -> dict[str, SliceFile]:
    """The slice of every stage, by file name, made if missing.

    A slice counts as present when its file exists and a manifest in slices_dir records it with
    the stage's layer range and its size (a file no manifest lists is checked by its metadata and
    hashed). If any is missing, the model (a built-in name, pulled if needed, or a path relative
    to the cluster file) is cut into every stage's range in one pass, into a temporary folder in
    slices_dir; the slices are then renamed to their names in the cluster file, and a
    ``<model stem>.manifest.json`` recording them is written. Raises NakError (unknown model,
    ranges that do not cover the model, a present file that holds other layers).
    """
    from .slicer import read_slice_meta, slice_model

    sdir = cf.slices_path
    names = slice_names(cf)
    listed = _listed(sdir) if sdir.is_dir() else {}
    out: dict[str, SliceFile] = {}
    missing = False
    for spec, name in zip(cf.stages, names):
        path = sdir / name
        info = listed.get(name)
        if not path.is_file():
            missing = True
        elif info is not None and info.range == spec.layers and info.bytes == path.stat().st_size:
            out[name] = SliceFile(path, info.sha256, info.bytes)
        else:
            meta = read_slice_meta(path)
            start, end = meta.get("nakshatra.layer_range_start"), meta.get("nakshatra.layer_range_end")
            if start is None or LayerRange(int(start), int(end)) != spec.layers:
                held = "no slice" if start is None else f"layers {LayerRange(int(start), int(end))}"
                raise NakError(f"{path} holds {held}, not the layers {spec.layers} of stage {spec.address}; "
                               "move it away (nak up then cuts the right slice) or fix the stage's slice name")
            echo(f"hashing {path} (no manifest lists it)")
            out[name] = SliceFile(path, sha256_file(path), path.stat().st_size)
    if not missing:
        return out
    model = _model_path(cf, progress)
    echo(f"cutting {model} into {len(cf.stages)} slices in {sdir}")
    try:
        sdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".nak-up-", dir=sdir))
    except OSError as e:
        raise NakError(f"cannot create the slices folder {sdir}: {e.strerror or e}; set slices_dir in "
                       f"{cf.path} to a writable folder") from None
    try:
        try:
            m = slice_model(model, ranges=[s.layers for s in cf.stages], out_dir=tmp, progress=progress)
        except NakError as e:
            raise NakError(f"{cf.path}: cannot cut {model}: {e}") from None
        infos = []
        for spec, name, info in zip(cf.stages, names, m.slices):
            os.replace(tmp / info.file, sdir / name)
            infos.append(replace(info, file=name))
            out[name] = SliceFile(sdir / name, info.sha256, info.bytes)
        Manifest(model=m.model, slices=infos).save(sdir / f"{model.stem}.manifest.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- commands --------------------------------------------------------------------------------------

def stage_flags(cf: ClusterFile, warn: Callable[[str], None] = lambda s: None) -> list[str]:
    """``nak serve`` flags for the cluster file's ``[options]`` (:data:`SERVE_FLAGS`); other keys
    than those and :data:`CLIENT_OPTIONS` are reported to ``warn`` and ignored."""
    out: list[str] = []
    for k, v in cf.options.items():
        if k in SERVE_FLAGS:
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise NakError(f"{cf.path}: options.{k} = {v!r} must be a number or a string")
            out += [SERVE_FLAGS[k], str(v)]
        elif k not in CLIENT_OPTIONS:
            warn(f"{cf.path}: options.{k} is not a stage option ({', '.join(SERVE_FLAGS)}); ignored")
    return out


def client_command(cf: ClusterFile, file_arg: str) -> str:
    """The ``nak run`` command line for the chain (mode and key from the cluster file)."""
    mode = cf.options.get("mode", "ring")
    parts = ["nak", "run", "--chain", ",".join(cf.addresses())]
    parts += {"ring": ["--ring"], "forwarding": ["--forwarding"], "relay": ["--relay"]}[mode]
    if cf.key_file:
        parts += ["--key-file", cf.key_file]
    return shlex.join(parts) + ' "prompt"'


def remote_command(cf: ClusterFile, inst: Instance, url: str, sha256: str, flags: Sequence[str]) -> str:
    """The ``nak serve`` command line to run on ``inst.host``: the slice path relative to where it
    runs (``slices_dir`` as written in the file), the layers, the address, the stage options,
    the key file as written in the file, and ``--fetch URL --sha256 HEX``."""
    rel = Path(cf.slices_dir) / inst.slice if cf.slices_dir and not Path(cf.slices_dir).is_absolute() \
        else Path(inst.slice)
    parts = ["nak", "serve", str(rel), "--layers", inst.layers.inclusive(), "--host", inst.host,
             "--port", str(inst.port), *flags]
    if cf.key_file:
        parts += ["--key-file", cf.key_file]
    parts += ["--fetch", url, "--sha256", sha256]
    return shlex.join(parts)


# ---- processes and state ----------------------------------------------------------------------------

def run_dir(cluster_path: Path | str) -> Path:
    """Where ``nak up`` keeps the state and logs of one cluster file (by its absolute path)."""
    from .paths import cache_dir

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


def _alive(proc: dict) -> bool:
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
        if _alive(p):
            _signal(p, signal.SIGTERM)
            live.append(p)
        else:
            out.append({**p, "stopped": "gone"})
    deadline = time.monotonic() + timeout_s
    while live and time.monotonic() < deadline:
        time.sleep(0.1)
        for p in [p for p in live if not _alive(p)]:
            live.remove(p)
            out.append({**p, "stopped": "term"})
    for p in live:
        _signal(p, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        for p in [p for p in live if not _alive(p)]:
            live.remove(p)
            out.append({**p, "stopped": "kill"})
    out += [{**p, "stopped": "left"} for p in live]
    by_pid = {int(d["pid"]): d for d in out}
    return [by_pid[int(p["pid"])] for p in procs]  # in the order given


_DETACHED: list[subprocess.Popen] = []  # kept so that no Popen is finalised (and warns) while running


def _spawn(cmd: list[str], log: Path, ready: Path) -> dict:
    """Start ``cmd`` detached from this terminal (own session, so ``nak up`` may exit and Ctrl-C
    does not reach it): stdout (the ready JSON line) to ``ready``, stderr to ``log``."""
    ready.unlink(missing_ok=True)
    with open(log, "wb") as lf, open(ready, "wb") as rf:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=rf, stderr=lf, start_new_session=True)
    _DETACHED.append(p)
    return {"pid": p.pid, "identity": _identity(p.pid) or "?", "log": str(log), "ready": str(ready),
            "cmd": shlex.join(cmd)}


def _wait_ready(procs: list[dict], timeout_s: float) -> None:
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
            elif not _alive(p):
                raise NakError(f"{p['what']} exited while starting (log {p['log']}):\n{_tail(Path(p['log']))}")
        if pending and time.monotonic() > deadline:
            p = pending[0]
            raise NakError(f"{p['what']} was not ready after {timeout_s:.0f} s (log {p['log']}):\n"
                           f"{_tail(Path(p['log']))}")
        if pending:
            time.sleep(0.1)


@dataclass
class UpResult:
    """What :func:`up` did: the processes it started (dicts as in the state file), the remote
    commands as ``(instance, command)``, the client command and the state file."""

    started: list[dict] = field(default_factory=list)
    remote: list[tuple[Instance, str]] = field(default_factory=list)
    client: str = ""
    state: Path | None = None


def up(cf: ClusterFile, this_hosts: Sequence[str] = (), files_port: int = DEFAULT_FILES_PORT,
       files_host: str = "", advertise: str = "", timeout_s: float = 120.0, progress: bool = False,
       echo: Callable[[str], None] = lambda s: None) -> UpResult:
    """Start the stages of ``cf`` on this host and return what runs where (see the module).

    ``this_hosts``: the addresses that mean this machine (default: detected, see
    :func:`is_this_host`). ``files_port`` / ``files_host``: where the slice file server listens
    (0: any free port; host default: 127.0.0.1 when every other host is loopback, else 0.0.0.0).
    ``advertise``: the address other hosts reach this machine at, for the fetch URL (default: the
    source address of the route to each host). ``timeout_s``: seconds each process may take to be
    ready. Raises NakError if the cluster is already up (state file with live processes), a port
    is in use, a non-loopback stage has no key, or a stage fails to start (everything started is
    stopped again).
    """
    from . import _nakshatra

    if cf.path is None:
        raise NakError("the cluster file has no path; load it with nakshatra.cluster.load_cluster")
    cf = replace(cf, path=cf.path.resolve())  # the stages get absolute paths
    spath = state_path(cf.path)
    if spath.exists():
        try:
            old = json.loads(spath.read_text())
        except ValueError:
            old = {}
        live = [p for p in old.get("processes", []) if _alive(p)]
        if live:
            raise NakError(f"{cf.path} is already up: {', '.join(p['what'] for p in live)} running (pids "
                           f"{', '.join(str(p['pid']) for p in live)}); run `nak down {cf.path}` first")
        spath.unlink()
    key_path = cf.resolve(cf.key_file) if cf.key_file else None
    if key_path is not None:
        from .auth import load_key

        key = load_key(key_path, env=False)
    else:
        key = None
    for s in cf.stages:
        for host in [s.host] + [_parse_address(r)[0] for r in s.replicas]:
            if not key and not os.environ.get("NAK_KEY") and not _nakshatra.is_loopback(host):
                raise NakError(f"{cf.path}: stage {s.address} (or a replica) listens on {host}, which is not loopback, "
                               "and the cluster has no key: run `nak keygen -o cluster.key` and add "
                               "key_file = \"cluster.key\" to the cluster file (then copy the key to every host)")
    insts = plan_instances(cf, this_hosts)
    local = [i for i in insts if i.local]
    remote = [i for i in insts if not i.local]
    flags = stage_flags(cf, warn=echo)
    for i in local:
        if port_in_use(i.host, i.port):
            raise NakError(f"stage {i.address}: port {i.port} is in use on {i.host}; stop what listens there "
                           f"(`nak down` of another cluster?) or change the port in {cf.path}")
    if remote:
        fhost = files_host or ("127.0.0.1" if all(_nakshatra.is_loopback(i.host) for i in remote) else "0.0.0.0")
        if files_port and port_in_use(fhost, files_port):
            raise NakError(f"the slice file server's port {files_port} is in use on {fhost}; pass --files-port N "
                           "(0: any free port)")
    slices = ensure_slices(cf, progress=progress, echo=echo)

    rdir = run_dir(cf.path)
    rdir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"cluster": str(cf.path.resolve()), "started": time.time(), "processes": []}
    procs: list[dict] = state["processes"]

    def save() -> None:
        write_atomic(spath, json.dumps(state, indent=1) + "\n")

    lock = ["--cpu-lock", str(rdir / "cpu.lock")] if len(local) > 1 and "threads" not in cf.options else []
    res = UpResult(state=spath)
    try:
        for n, i in enumerate(local):
            tag = f"stage-{i.host}-{i.port}".replace(":", "_")
            cmd = [sys.executable, "-m", "nakshatra.serve", str(slices[i.slice].path), "--layers",
                   i.layers.inclusive(), "--host", i.host, "--port", str(i.port), "--ready-json", *flags, *lock,
                   *(["--key-file", str(key_path)] if key_path else [])]
            p = _spawn(cmd, rdir / f"{tag}.log", rdir / f"{tag}.ready")
            p.update(what=f"stage {i.address} (layers {i.layers.inclusive()})", kind="stage", address=i.address,
                     host=i.host, port=i.port, layers=i.layers.inclusive(), slice=str(slices[i.slice].path))
            procs.append(p)
            save()
        if remote:
            names = sorted({i.slice for i in insts})
            cmd = [sys.executable, "-m", "nakshatra.up", "files", "--dir", str(cf.slices_path), "--host", fhost,
                   "--port", str(files_port), *(["--key-file", str(key_path)] if key_path else []),
                   *(f"--sha256={n}={slices[n].sha256}" for n in names if slices[n].sha256), *names]
            p = _spawn(cmd, rdir / "files.log", rdir / "files.ready")
            p.update(what=f"slice file server {fhost}:{files_port}", kind="files", host=fhost, port=files_port)
            procs.append(p)
            save()
        _wait_ready(procs, timeout_s)
        for p in procs:
            if p["kind"] == "files":
                p["what"] = f"slice file server {p['host']}:{p['port']}"
        save()
    except BaseException:
        stop_processes(procs)
        spath.unlink(missing_ok=True)
        raise
    res.started = procs
    files = next((p for p in procs if p["kind"] == "files"), None)
    for i in remote:
        uhost = advertise or (files["host"] if files["host"] not in ("0.0.0.0", "::") else _route_address(i.host))
        uhost = f"[{uhost}]" if ":" in uhost else uhost
        url = f"http://{uhost}:{files['port']}/slices/{urllib.parse.quote(i.slice)}"
        res.remote.append((i, remote_command(cf, i, url, slices[i.slice].sha256, flags)))
    res.client = client_command(cf, str(cf.path))
    return res


def down(cluster_path: Path | str, timeout_s: float = 10.0) -> list[dict]:
    """Stop what ``nak up`` started from ``cluster_path`` (see :func:`stop_processes`) and remove
    its state file. Returns the processes, each with ``stopped``; an empty list if nothing was
    up. Raises NakError if some process could not be stopped (the state is then kept)."""
    spath = state_path(cluster_path)
    if not spath.exists():
        return []
    try:
        state = json.loads(spath.read_text())
    except ValueError:
        spath.unlink()
        return []
    done = stop_processes(state.get("processes", []), timeout_s)
    left = [p for p in done if p["stopped"] == "left"]
    if left:
        raise NakError(f"could not stop {', '.join(p['what'] + ' (pid ' + str(p['pid']) + ')' for p in left)}; "
                       f"stop it by hand, then run `nak down {cluster_path}` again")
    spath.unlink(missing_ok=True)
    return done


# ---- the slice file server -----------------------------------------------------------------------

def fetch_token(key: bytes, name: str) -> str:
    """Hex HMAC-SHA256 under the cluster key of a slice's file name: the proof a download
    carries (header :data:`AUTH_HEADER`) when the cluster has a key. It is the same for every
    download of that file (nothing is secret in the transfer itself, which is not encrypted)."""
    return hmac.new(key, b"nakshatra-fetch-v1\0" + name.encode(), hashlib.sha256).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: SliceFileServer
    server_version = "nakshatra-files"

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        name = urllib.parse.unquote(path[len("/slices/"):]) if path.startswith("/slices/") else ""
        file = self.server.files.get(name)
        if file is None:
            self.send_error(404, "no such slice here", "this server offers only the slices of its cluster file")
            return
        if self.server.key is not None:
            got = self.headers.get(AUTH_HEADER, "")
            if not hmac.compare_digest(got.encode(), fetch_token(self.server.key, name).encode()):
                self.send_error(403, "cluster key required", "give the stage the cluster's --key-file")
                return
        try:
            f = open(file, "rb")
        except OSError as e:
            self.send_error(404, "slice missing", f"{file}: {e.strerror}")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            span = _byte_range(self.headers.get("Range", ""), size)
            if span == "unsatisfiable":
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = span if isinstance(span, tuple) else (0, size)
            self.send_response(206 if isinstance(span, tuple) else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            etag = self.server.etag(name)
            if etag:
                self.send_header("ETag", f'"{etag}"')
            if isinstance(span, tuple):
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if body and end > start:
                try:
                    self.wfile.flush()
                    self.connection.sendfile(f, start, end - start)
                except (BrokenPipeError, ConnectionResetError):
                    self.log_message("%s: client went away", name)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"nak files: {self.address_string()} {format % args}\n")
        sys.stderr.flush()


def _byte_range(header: str, size: int) -> tuple[int, int] | str | None:
    """The half-open byte range a ``Range`` header asks of a ``size``-byte file (RFC 9110 section
    14.1.2: ``bytes=a-b``, ``bytes=a-``, ``bytes=-n``; the end is clamped to the file), None for
    the whole file (no header, or one this server does not serve partially: several ranges, other
    units), ``"unsatisfiable"`` for a range that starts past the end."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or not (m.group(1) or m.group(2)):
        return None
    if not m.group(1):  # the last n bytes
        n = int(m.group(2))
        return (max(0, size - n), size) if n else "unsatisfiable"
    start = int(m.group(1))
    end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    if start >= size:
        return "unsatisfiable"
    return None if end <= start else (start, end)


class SliceFileServer(ThreadingHTTPServer):
    """A read-only HTTP server of some files of one folder: ``GET /slices/<name>`` for each name
    given, nothing else (404). With ``key``, a request must carry :func:`fetch_token` in header
    :data:`AUTH_HEADER` (else 403). ``port`` 0 picks a free port (``server_address`` tells).

    It answers single byte ranges (``Range: bytes=a-b``, 206), so a stage can fetch just its part
    of a whole model (:mod:`nakshatra.remote`), and sends each file's sha256 as its ETag
    where ``sha256s`` gives it (name -> hex)."""

    daemon_threads = True

    def __init__(self, folder: Path, names: Sequence[str], host: str = "127.0.0.1", port: int = 0,
                 key: bytes | None = None, sha256s: dict[str, str] | None = None) -> None:
        self.files = {n: Path(folder) / n for n in names if Path(n).name == n}
        self.key = key
        self._sha256s = dict(sha256s or {})
        self._etag_lock = threading.Lock()
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    def etag(self, name: str) -> str | None:
        """The hex sha256 of file ``name`` if it was given, else None."""
        return self._sha256s.get(name)


def _file_hashes(folder: Path, names: Sequence[str], given: Sequence[str]) -> dict[str, str]:
    """sha256 of each file: ``NAME=HEX`` as given, else hashed (a whole GGUF's remembered by path,
    size and mtime in the slice cache's index, as :func:`nakshatra.slicer.cached_slice` does).
    Raises NakError for a malformed ``NAME=HEX``."""
    out = {}
    for item in given:
        name, _, hexsum = item.partition("=")
        if not _SHA256.match(hexsum.strip().lower()):
            raise NakError(f"--sha256 {item!r}: give NAME=HEX with a 64-digit hex sha256")
        out[name] = hexsum.strip().lower()
    for name in names:
        path = Path(folder) / name
        if name not in out and path.is_file():
            out[name] = _file_sha256(path)
    return out


def _file_sha256(path: Path) -> str:
    """sha256 of the file ``path``: remembered in the slice cache's index for a whole single-file
    GGUF (the identity :func:`nakshatra.slicer.cached_slice` keeps there is that hash), else
    hashed now."""
    from .paths import cache_dir
    from .shards import open_model
    from .slicer import _known_sha256, _locked

    try:
        model = open_model(path)
    except SliceError:
        return sha256_file(path)
    if model.sharded:  # a shard's identity is the whole model's, not the file's
        return sha256_file(path)
    root = cache_dir() / "slices"
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        return _known_sha256(model, root / "index.json")


def _files_main(argv: Sequence[str]) -> int:
    from .auth import load_key

    ap = argparse.ArgumentParser(prog="python -m nakshatra.up files",
                                 description="Serve slice files read-only over HTTP (GET /slices/NAME).")
    ap.add_argument("names", nargs="+", help="file names in --dir that may be fetched")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=DEFAULT_FILES_PORT)
    ap.add_argument("--key-file", default="", help="require fetch_token() under this cluster key (default: $NAK_KEY)")
    ap.add_argument("--sha256", action="append", default=[], metavar="NAME=HEX",
                    help="a file's sha256, sent as its ETag (files not given are hashed at start)")
    a = ap.parse_args(list(argv))
    try:
        key = load_key(a.key_file or None)  # as the stages: the key file, else $NAK_KEY
        srv = SliceFileServer(a.dir, a.names, a.host, a.port, key, _file_hashes(a.dir, a.names, a.sha256))
    except (NakError, OSError) as e:
        print(f"nak files: error: cannot serve on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 1

    def on_term(signum: int, frame: object) -> None:
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    port = srv.server_address[1]
    print(json.dumps({"host": a.host, "port": port, "pid": os.getpid()}), flush=True)
    print(f"nak files: serving {', '.join(sorted(srv.files))} from {a.dir} on {a.host}:{port}"
          + (" (cluster key required)" if key else ""), file=sys.stderr, flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    print("nak files: stopped", file=sys.stderr)
    return 0


# ---- fetching a slice (nak serve --fetch) ------------------------------------------------------

class _FetchFailed(Exception):
    pass


def _progress_bar(enabled: bool) -> Any:
    """The slicer's byte progress bar (stderr), or None when ``enabled`` is false."""
    from .slicer import byte_progress

    return byte_progress(enabled) if enabled else None


def _download_slice(url: str, dest: Path, want: str, key: bytes | None, progress: bool) -> None:
    """Fetch ``url`` into a temporary file beside ``dest``, check it, rename it to ``dest``;
    raises _FetchFailed naming the URL and the fix (the temporary file is deleted)."""
    from .slicer import verify_slice

    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    headers = {AUTH_HEADER: fetch_token(key, name)} if key else {}
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 403:
                why = ("this stage's cluster key is not the one the server has" if key else
                       "the server needs the cluster key") + "; pass the cluster's --key-file (or set NAK_KEY)"
            elif e.code == 404:
                why = "that server offers no such slice; copy the URL from `nak up`'s output again"
            else:
                why = f"{e.reason}"
            raise _FetchFailed(f"{url}: refused ({e.code}): {why}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise _FetchFailed(f"{url}: cannot connect ({reason}): is `nak up` running on that host, and its "
                               "--files-port reachable from here?") from None
        with resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            h = hashlib.sha256()
            n = 0
            bar = _progress_bar(progress)
            try:
                if bar is not None:
                    bar.start()
                    task = bar.add_task(f"fetching {dest.name}", total=total)
                with open(tmp, "wb") as out:
                    while True:
                        try:
                            chunk = resp.read(CHUNK)
                        except OSError as e:
                            raise _FetchFailed(f"{url}: the transfer broke after {n} bytes ({e}); run the "
                                               "command again") from None
                        if not chunk:
                            break
                        out.write(chunk)
                        h.update(chunk)
                        n += len(chunk)
                        if bar is not None:
                            bar.advance(task, len(chunk))
            finally:
                if bar is not None:
                    bar.stop()
        if total is not None and n != total:
            raise _FetchFailed(f"{url}: got {n} of {total} bytes; run the command again")
        got = h.hexdigest()
        if got != want:
            raise _FetchFailed(f"{url}: the downloaded file's sha256 is {got}, not the {want} given with --sha256; "
                               "deleted it. The slice on the serving host was re-made or replaced: run `nak up` "
                               "there again and use the command it prints now")
        try:
            verify_slice(tmp)
        except SliceError as e:
            raise _FetchFailed(f"{url}: the file has the expected sha256 but fails its own check ({e}); deleted it. "
                               "The serving host's slice is damaged: delete it there and run `nak up` again "
                               "to re-make it") from None
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_slice(urls: Sequence[str], dest: Path | str, sha256: str, key: bytes | None = None,
                progress: bool | None = None) -> bool:
    """Make sure ``dest`` is the slice of hex whole-file ``sha256``, fetching it if missing.

    If ``dest`` exists it must have that sha256 (else NakError: remove it to fetch the new one).
    If it is missing, each URL of ``urls`` is tried in order (mirrors): the file is streamed
    into ``.<name>.<pid>.part`` beside ``dest`` (a Rich progress bar on stderr when ``progress``,
    default: stderr is a terminal), its sha256 must equal ``sha256`` and its tensor data its own
    metadata (:func:`nakshatra.slicer.verify_slice`); then it is renamed to ``dest``. A failed
    download leaves nothing behind. ``key``: the cluster key, when the file server requires it.
    Returns True if it fetched the file, False if ``dest`` was already there. Raises NakError
    naming each URL tried, what went wrong and what to do.
    """
    want = sha256.strip().lower()
    if not want:
        raise NakError("--fetch needs --sha256 HEX, the slice file's sha256 (`nak up` prints the whole command)")
    if not _SHA256.match(want):
        raise NakError(f"--sha256 {sha256!r} is not a sha256 (64 hex digits); copy it from `nak up`'s output")
    dest = Path(dest)
    if dest.exists():
        got = sha256_file(dest)
        if got != want:
            raise NakError(f"{dest} exists but its sha256 is {got}, not {want}: it is another or an older slice; "
                           "delete it (it is then fetched again) or give another path")
        return False
    if not urls:
        raise NakError(f"{dest}: no such file; give --fetch URL to fetch it")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NakError(f"cannot create {dest.parent}: {e.strerror or e}; give a slice path in a writable folder") \
            from None
    if progress is None:
        progress = sys.stderr.isatty()
    errors = []
    for url in urls:
        try:
            _download_slice(url, dest, want, key, progress)
            print(f"nak serve: fetched {dest} from {url} ({dest.stat().st_size / 2**20:.1f} MiB, sha256 ok)",
                  file=sys.stderr, flush=True)
            return True
        except _FetchFailed as e:
            errors.append(str(e))
    raise NakError(f"cannot fetch {dest}: " + "; ".join(errors))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nakshatra.up files ...`` (the slice file server ``nak up`` starts)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "files":
        print("usage: python -m nakshatra.up files --dir DIR [--host H] [--port P] [--key-file K] NAME ...",
              file=sys.stderr)
        return 2
    return _files_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
