"""The baseline Nakshatra must beat: llama.cpp's own RPC split (``nak bench --rpc-baseline``).

Upstream's ``ggml-rpc-server`` (tools/rpc) and ``llama-bench`` (tools/llama-bench) are built on
demand in the cached llama.cpp build tree that ``pip install .`` compiled (cpp/cmake/llama.cmake
builds it with ``-DGGML_RPC=ON``), so they share its object files and patches; nothing is added to
the repository. ``llama-bench -ngl 99 --rpc a,b,c`` then offloads every layer to the RPC servers,
split by layer ranges across them, and the host drives them one after the other (star topology).

Typical use::

    res = run_rpc_baseline(Path("smollm2.gguf"), n_servers=3, threads=2, prompt_lens=(128,))
    res["decode_tps"]["median"]   # tok/s, same shape as nakshatra.bench.side_by_side.bench_single's result
"""

from __future__ import annotations

import errno
import fcntl
import json
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import NakError
from .side_by_side import peak_rss_bytes

RPC_SERVER = "ggml-rpc-server"
LLAMA_BENCH = "llama-bench"
_REINSTALL = "reinstall Nakshatra from its source tree with `pip install .` (or `nak build`)"


def build_info() -> dict[str, str]:
    """What ``pip install .`` recorded about the llama.cpp build (``_build_info.json`` in the
    ``nakshatra`` package directory): ``backend``, ``llama_build_dir``, ``llama_source_dir``, ``llama_commit``,
    ``patch_hash``. Raises NakError when the file is missing (an install from before it existed)."""
    path = Path(__file__).resolve().parents[1] / "_build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NakError(f"{path} is missing or unreadable ({e}); {_REINSTALL}") from e


def _tool(name: str, module: str, attr: str) -> str:
    """``name`` from the PyPI package ``module`` (its directory ``module.attr``; in a venv that is
    the venv's scripts directory, so also the base interpreter's), else from PATH."""
    import shutil

    dirs = [Path(sys.base_prefix) / "bin"]
    try:
        dirs.insert(0, Path(getattr(__import__(module), attr)))
    except (ImportError, AttributeError):
        pass
    found = next((str(d / name) for d in dirs if (d / name).is_file()), None) or shutil.which(name)
    if found is None:
        raise NakError(f"`{name}` is neither installed as a Python package nor on PATH; "
                       f"`pip install {module}` (a dependency of Nakshatra)")
    return found


def _lock(tree: Path, timeout_s: float = 3600.0):
    """Take ``<tree>/.lock`` as cpp/cmake/llama.cmake's ``file(LOCK)`` does (a POSIX fcntl write
    lock on the whole file), waiting up to ``timeout_s``; returns the open file (close to release)."""
    f = open(tree / ".lock", "a+")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > deadline:
                f.close()
                raise NakError(f"could not lock {tree / '.lock'} ({e}); another build (a pip install?) "
                               "holds it: wait for it to finish and try again") from e
            time.sleep(1.0)


def _stale(bins: Sequence[Path], stamp: Path, tree: Path) -> bool:
    """A binary or the stamp of their last build is missing, or a static library in the tree is
    newer than the stamp (``pip install .`` rebuilt llama.cpp after a patch changed)."""
    if not stamp.is_file() or not all(b.is_file() for b in bins):
        return True
    built = stamp.stat().st_mtime
    return any(a.stat().st_mtime > built for a in tree.rglob("*.a")
               if a.relative_to(tree).parts[0] != "install")


def ensure_tools(force: bool = False, progress: bool = True) -> dict[str, Path]:
    """Build ``ggml-rpc-server`` and ``llama-bench`` in the cached llama.cpp tree unless they are
    there and newer than its libraries; returns ``{"rpc_server": path, "llama_bench": path}``
    (both in ``<tree>/bin``). The first build takes minutes (llama.cpp's common library and the two
    tools); progress lines go to stderr when ``progress``.

    The tree is configured with tools on, the two targets are built, and it is configured back to
    what cpp/cmake/llama.cmake asks for (tools off), all under the tree's build lock, so the next
    ``pip install .`` builds and installs only the libraries again. Raises NakError when the tree
    is missing, or configuring or building fails (with the tail of the log)."""
    tree = Path(build_info()["llama_build_dir"])
    if not (tree / "CMakeCache.txt").is_file():
        raise NakError(f"the llama.cpp build tree {tree} is missing (cache cleared?); {_REINSTALL}")
    bins = {"rpc_server": tree / "bin" / RPC_SERVER, "llama_bench": tree / "bin" / LLAMA_BENCH}
    stamp = tree / "bin" / ".rpc-baseline-built"
    if not force and not _stale(list(bins.values()), stamp, tree):
        return bins
    cmake = _tool("cmake", "cmake", "CMAKE_BIN_DIR")
    ninja = _tool("ninja", "ninja", "BIN_DIR")
    log = tree / "rpc-baseline-build.log"

    def step(what: str, args: list[str], out) -> None:
        argv = [cmake, *args]
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode:
            out.flush()
            raise NakError(f"{what} failed (full log: {log}):\n{_tail(log, 30)}\n"
                           f"fix the cause above, or {_REINSTALL} to rebuild the tree")

    make = f"-DCMAKE_MAKE_PROGRAM={ninja}"
    t0 = time.monotonic()
    with _lock(tree), open(log, "w") as out:
        if progress:
            print(f"nakshatra: building {RPC_SERVER} and {LLAMA_BENCH} in {tree} "
                  f"(first time a few minutes; log: {log})", file=sys.stderr, flush=True)
        try:
            step("configuring llama.cpp with its tools",
                 [make, "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON", str(tree)], out)
            step(f"building {RPC_SERVER} and {LLAMA_BENCH}",
                 ["--build", str(tree), "--target", RPC_SERVER, LLAMA_BENCH], out)
            stamp.touch()
        finally:
            # back to tools off, as llama.cmake configures the tree: its `--target install` must
            # not build every tool (the two binaries stay in <tree>/bin)
            step("configuring llama.cpp back without its tools",
                 [make, "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_COMMON=OFF", str(tree)], out)
    if progress:
        print(f"nakshatra: built the RPC baseline tools in {time.monotonic() - t0:.0f} s",
              file=sys.stderr, flush=True)
    return bins


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(proc: subprocess.Popen, port: int, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise NakError(f"{RPC_SERVER} on port {port} exited with status {proc.returncode}:\n"
                           f"{_tail(log)}\ncheck the message above (port taken? retry)")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise NakError(f"{RPC_SERVER} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s:"
                               f"\n{_tail(log)}") from None
            time.sleep(0.05)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def _stat(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "spread": max(values) - min(values), "n": len(values)}


def parse_llama_bench(tests: list[dict[str, Any]]) -> dict[str, Any]:
    """Turn ``llama-bench -o json`` output into bench_single's shape: ``prefill_tps`` and
    ``ttft_ms`` keyed by prompt length (tok/s; ms to process the prompt), ``decode_tps`` (tok/s),
    each ``{"median", "spread", "n"}`` over llama-bench's repetitions (``samples_ts``,
    ``samples_ns``). Raises NakError when a prefill or decode test is missing."""
    out: dict[str, Any] = {"prefill_tps": {}, "ttft_ms": {}}
    for t in tests:
        if t["n_prompt"] > 0 and t["n_gen"] == 0:
            out["prefill_tps"][str(t["n_prompt"])] = _stat(t["samples_ts"])
            out["ttft_ms"][str(t["n_prompt"])] = _stat([ns / 1e6 for ns in t["samples_ns"]])
        elif t["n_gen"] > 0 and t["n_prompt"] == 0:
            out["decode_tps"] = _stat(t["samples_ts"])
    if not out["prefill_tps"] or "decode_tps" not in out:
        raise NakError(f"{LLAMA_BENCH} reported no prefill or no decode test: {tests!r}")
    return out


def run_rpc_baseline(model: Path, n_servers: int = 3, threads: int = 2,
                     prompt_lens: Sequence[int] = (128, 512), n_decode: int = 128, reps: int = 3,
                     server_threads: int = 0,
                     start_timeout_s: float = 60.0, progress: bool = True,
                     address_map: Callable[[int, str], str] | None = None) -> dict[str, Any]:
    """Run ``model`` split by layers over ``n_servers`` local ``ggml-rpc-server`` processes on
    127.0.0.1 with upstream's ``llama-bench`` (built first if needed, see :func:`ensure_tools`).

    ``threads`` is llama-bench's (the host's) thread count, run with ``--poll 0`` like our stages'
    thread pools: with llama-bench's default (50) the host's idle threads spin while a server
    computes and take cores from it (on 2 cores decode 64 instead of 76 tok/s with 1 server
    thread, 12 instead of 24 with 2). ``server_threads`` is each server's, 0 for
    ``max(1, threads // n_servers)`` as our local stages decode (nakshatra.server.local.LocalStages). A
    server has one count for prefill and decode: on the 2-core VM, SmolLM2 Q4_1 (p128, n64) over 3
    servers gave prefill 180 and decode 78 tok/s with 1 thread each, prefill 350 and decode 26 tok/s
    with 2 (the host drives the servers one after the other, so only one computes at a time);
    llama-bench without RPC: 350 and 139. ``prompt_lens`` and ``n_decode`` are tokens; each figure
    is over ``reps`` repetitions after llama-bench's warm-up. Decode runs from an empty context
    (llama-bench's ``tg`` test), not after the prompt.

    Returns bench_single's shape: ``prefill_tps`` {str(n): {median, spread, n}} (tok/s),
    ``decode_tps`` {median, spread, n} (tok/s), ``ttft_ms`` {str(n): ...} (prompt time, ms), plus
    ``servers`` (count), ``server_threads``, ``peak_rss_bytes`` (each server's VmHWM, bytes) and
    ``command`` (the llama-bench command line). The servers are stopped on return, error or Ctrl-C.

    Raises NakError when the tools cannot be built, a server does not start, or llama-bench fails
    (with the tail of its stderr). ``address_map(i, "127.0.0.1:PORT")`` may give llama-bench
    another address for server ``i`` (e.g. a nakshatra.bench.linkdelay relay in front of it)."""
    if n_servers < 1 or threads < 1 or not prompt_lens or n_decode < 1 or reps < 1:
        raise NakError("run_rpc_baseline needs n_servers, threads, n_decode, reps >= 1 and a prompt length")
    model = Path(model)
    if not model.is_file():
        raise NakError(f"model {model} does not exist; pass a GGUF file (`nak pull` fetches one)")
    bins = ensure_tools(progress=progress)
    server_threads = server_threads or max(1, threads // n_servers)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="nak-rpc-") as logdir:
        try:
            addresses = []
            for i in range(n_servers):
                port = _free_port()
                log = Path(logdir) / f"server{i}.log"
                with open(log, "w") as f:
                    procs.append(subprocess.Popen(
                        [str(bins["rpc_server"]), "-H", "127.0.0.1", "-p", str(port),
                         "-t", str(server_threads)],
                        stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
                _wait_listening(procs[-1], port, log, start_timeout_s)
                addresses.append(f"127.0.0.1:{port}")
            if address_map:
                addresses = [address_map(i, a) for i, a in enumerate(addresses)]
            argv = [str(bins["llama_bench"]), "-m", str(model), "--rpc", ",".join(addresses),
                    "-ngl", "99", "-t", str(threads), "--poll", "0", "-p", ",".join(map(str, prompt_lens)),
                    "-n", str(n_decode), "-r", str(reps), "-o", "json"]
            r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                tail = "\n".join(r.stderr.splitlines()[-20:])
                raise NakError(f"{LLAMA_BENCH} exited with status {r.returncode}:\n{tail}\n"
                               f"servers' logs: {_tail(Path(logdir) / 'server0.log', 5)}")
            try:
                tests = json.loads(r.stdout)
            except ValueError as e:
                raise NakError(f"{LLAMA_BENCH} printed no JSON ({e}): {r.stdout[-500:]!r}") from e
            out = parse_llama_bench(tests)
            out.update(servers=n_servers, server_threads=server_threads,
                       peak_rss_bytes=[peak_rss_bytes(p.pid) for p in procs], command=shlex.join(argv))
            return out
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
