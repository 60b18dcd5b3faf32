"""``nak up`` / ``nak down``: run the stages of a cluster file that belong on this host, hand the
slices to the other hosts over HTTP, and fetch a slice (``nak serve --fetch``).

``nak up cluster.toml`` (see :func:`up`):

1. makes the slices the cluster file names, in its ``slices_dir``, if any is missing (one
   :func:`nakshatra.gguf.slicer.slice_model` pass over the model; a ``<stem>.manifest.json`` records each
   slice's sha256);
2. starts, as detached processes (``python -m nakshatra.server.serve SLICE ... --ready-json``), every
   stage and replica whose host is this machine, and waits until each is ready;
3. if some stage runs elsewhere, starts a read-only HTTP server for the slice files the cluster
   file names (``--files-port``, 7070 by default; nothing else is reachable through it, and with a
   cluster key every download must carry a MAC of the file name under the key, see
   :func:`fetch_token`), and prints, for each other host, the exact ``nak serve`` command to run
   there: it fetches the slice from that server if missing, checks its sha256 and serves.

What it started (pids, ports, logs) is recorded in a state file,
``cache_dir()/run/<sha256 of the cluster file's absolute path>[:16]/state.json``; ``nak down`` stops
exactly those processes (SIGTERM, then SIGKILL after a timeout) and removes the state.

The slice file server is :mod:`.fileserver`, the download on the other host :mod:`.fetch`, the
process bookkeeping :mod:`.processes`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import NakError, SliceError
from ..gguf.manifest import Manifest, SliceInfo, sha256_file, write_atomic
from ..ranges import LayerRange
from ..server.options import cluster_flags
from .config import ClusterFile
from .fileserver import DEFAULT_FILES_PORT
from .processes import alive, port_in_use, run_dir, spawn, state_path, stop_processes, wait_ready

SERVE_FLAGS = cluster_flags()
"""Cluster file ``[options]`` passed to every stage, and the ``nak serve`` flag of each."""

CLIENT_OPTIONS = ("mode", "timeout")
"""Cluster file ``[options]`` meant for clients (``nak run``), not for stages."""

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
    from ..gguf.hub import is_ref
    from ..gguf.models import BUILTIN, resolve_model

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
    from ..gguf.slicer import read_slice_meta, slice_model

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
    from .. import _nakshatra

    if cf.path is None:
        raise NakError("the cluster file has no path; load it with nakshatra.cluster.config.load_cluster")
    cf = replace(cf, path=cf.path.resolve())  # the stages get absolute paths
    spath = state_path(cf.path)
    if spath.exists():
        try:
            old = json.loads(spath.read_text())
        except ValueError:
            old = {}
        live = [p for p in old.get("processes", []) if alive(p)]
        if live:
            raise NakError(f"{cf.path} is already up: {', '.join(p['what'] for p in live)} running (pids "
                           f"{', '.join(str(p['pid']) for p in live)}); run `nak down {cf.path}` first")
        spath.unlink()
    key_path = cf.resolve(cf.key_file) if cf.key_file else None
    if key_path is not None:
        from ..auth import load_key

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
            cmd = [sys.executable, "-m", "nakshatra.server.serve", str(slices[i.slice].path), "--layers",
                   i.layers.inclusive(), "--host", i.host, "--port", str(i.port), "--ready-json", *flags, *lock,
                   *(["--key-file", str(key_path)] if key_path else [])]
            p = spawn(cmd, rdir / f"{tag}.log", rdir / f"{tag}.ready")
            p.update(what=f"stage {i.address} (layers {i.layers.inclusive()})", kind="stage", address=i.address,
                     host=i.host, port=i.port, layers=i.layers.inclusive(), slice=str(slices[i.slice].path))
            procs.append(p)
            save()
        if remote:
            names = sorted({i.slice for i in insts})
            cmd = [sys.executable, "-m", "nakshatra.cluster.fileserver", "--dir", str(cf.slices_path), "--host", fhost,
                   "--port", str(files_port), *(["--key-file", str(key_path)] if key_path else []),
                   *(f"--sha256={n}={slices[n].sha256}" for n in names if slices[n].sha256), *names]
            p = spawn(cmd, rdir / "files.log", rdir / "files.ready")
            p.update(what=f"slice file server {fhost}:{files_port}", kind="files", host=fhost, port=files_port)
            procs.append(p)
            save()
        wait_ready(procs, timeout_s)
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



def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nakshatra.cluster.up files ...``: the slice file server, as before 0.2
    (now ``python -m nakshatra.cluster.fileserver ...``)."""
    from .fileserver import main as files_main

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "files":
        print("usage: python -m nakshatra.cluster.fileserver --dir DIR [--host H] [--port P] [--key-file K] NAME ...",
              file=sys.stderr)
        return 2
    return files_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
