"""An oracle Nakshatra did not write: stock llama.cpp's ``llama-completion``, built unpatched.

The tests compare a split chain against :class:`nakshatra._nakshatra.Reference`, which links the
*patched* llama.cpp. This module builds upstream's own completion tool (tools/completion) from the
*pristine* pinned source, the tree ``cpp/cmake/fetch_llama.py`` mirrored before patching (its path
is recorded in ``<patched mirror>/.nakshatra-patches.json``), and runs it greedily, so a chain can
also be checked against code no Nakshatra patch touched.

Where the build lives: ``<cache>/llama.cpp/upstream-<key>/`` (``<cache>`` as
:func:`nakshatra.paths.cache_dir`, the same rule as cpp/cmake/llama.cmake), ``<key>`` a hash of
the pristine tree's path, the ggml it links and the CMake options. The first build configures
llama.cpp's CMake project out of tree (the pristine tree is only read) and builds the single
target ``llama-completion``; later calls and other checkouts reuse it. Two processes building at
once serialise on ``<dir>/.lock`` (a POSIX lock, as the project's build).

By default the tool links the compiled ggml that ``pip install .`` installed with the project's
llama.cpp (``<llama_build_dir>/install/lib/cmake/ggml``, through llama.cpp's
``LLAMA_USE_SYSTEM_GGML``): our patches touch only ``src/`` (refused otherwise, see
:func:`pristine_source`), so that ggml is upstream's, and only ``libllama`` + ``common`` +
the tool are compiled: 103 build steps, 13.5 CPU-minutes (21 minutes wall on the 2-core VM while
other builds loaded it; about 7 on 2 idle cores). A cached build costs a stat of a few files
(about 10 ms). The cache is not invalidated when a ``NAKSHATRA_LLAMA_CPP_DIR`` checkout changes:
pass ``force=True`` then.

Typical use::

    res = complete(Path("smollm2.gguf"), "The stars", n_predict=32, n_ctx=1024, threads=2)
    res.text, res.prompt_tokens
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NakError
from ..paths import cache_dir
from .rpc_baseline import _REINSTALL, _lock, _tail, _tool, build_info

COMPLETION = "llama-completion"
DEFAULT_N_UBATCH = 512  # the stages' n_ubatch (cpp/stage/stage.h), llama.cpp's default

# every option the build passes; LLAMA_CURL is deprecated (a warning) at the pinned commit, so absent
_CMAKE_OPTIONS = (
    "-G", "Ninja",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_TOOLS_INSTALL=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DGGML_OPENMP=OFF", "-DGGML_BACKEND_DL=OFF",
)


@dataclass
class UpstreamBuild:
    """Where the oracle was built: ``binary`` (the llama-completion executable), ``dir`` (its
    cache directory), ``pristine`` (the llama.cpp source it was compiled from), ``ggml_dir`` (the
    reused ggml CMake package, or None when ggml was compiled here too), ``built_s`` (seconds this
    call spent configuring and compiling; 0.0 when the cached build was current)."""

    binary: Path
    dir: Path
    pristine: Path
    ggml_dir: Path | None
    built_s: float = 0.0


@dataclass
class UpstreamResult:
    """One greedy run of upstream llama-completion.

    ``data``: the bytes it printed for the generated tokens (each token's piece, special tokens
    as empty strings, exactly as llama.cpp's ``common_token_to_piece``); ``text``: the same decoded
    as UTF-8 (invalid bytes replaced); ``prompt_tokens``: the prompt's token ids as the tool
    tokenised it (from ``--verbose-prompt``); ``eog``: it stopped at an end-of-generation token
    (which prints nothing) before ``n_predict`` tokens; ``command``: its argv; ``stderr``: its log;
    ``seconds``: wall time of the run (model load included)."""

    data: bytes
    text: str
    prompt_tokens: list[int]
    eog: bool
    command: list[str]
    stderr: str = field(repr=False)
    seconds: float = 0.0


def pristine_source() -> tuple[Path, dict]:
    """The unpatched llama.cpp tree the installed extension was built from, and the patch record
    (``.nakshatra-patches.json`` of the patched mirror: ``pristine``, ``commit``, ``files``, ...).

    Checks that the tree exists, is a llama.cpp tree, is not the patched mirror, and that every
    file our patches touch differs there from the patched copy (so it really is unpatched).
    Raises NakError naming the fix (reinstall) when any of that fails, and when a patch touches
    ggml (then reusing the project's compiled ggml would not be upstream's: pass ``own_ggml``)."""
    info = build_info()
    mirror = Path(info["llama_source_dir"])
    record = mirror / ".nakshatra-patches.json"
    try:
        meta = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        raise NakError(f"{record} is missing or unreadable ({e}); {_REINSTALL}") from e
    pristine = Path(meta["pristine"])
    if not (pristine / "include" / "llama.h").is_file() or not (pristine / "tools" / "completion").is_dir():
        raise NakError(f"the pristine llama.cpp tree {pristine} is missing or has no tools/completion "
                       f"(cache cleared?); {_REINSTALL} to fetch it again")
    if pristine.resolve() == mirror.resolve():
        raise NakError(f"{pristine} is the patched mirror, not the pristine source; {_REINSTALL}")
    for rel in meta.get("files", []):
        if (pristine / rel).is_file() and (pristine / rel).read_bytes() == (mirror / rel).read_bytes():
            raise NakError(f"{pristine / rel} equals the patched {mirror / rel}: the tree recorded as "
                           f"pristine carries our patches; {_REINSTALL} (the source is never patched in place)")
    return pristine, meta


def _cached_value(cache: Path, name: str) -> str | None:
    """``name``'s value in a CMakeCache.txt (``NAME:TYPE=value``), None when absent."""
    try:
        for line in cache.read_text(errors="replace").splitlines():
            if line.startswith(name + ":"):
                return line.split("=", 1)[1]
    except OSError:
        pass
    return None


def _compiler_args(project_cache: Path) -> list[str]:
    """The project's C and C++ compilers (so both builds compile alike), else the environment's;
    raises NakError when there is no C++ compiler at all."""
    args = []
    for lang, env, fallbacks in (("C", "CC", ("cc", "gcc", "clang")), ("CXX", "CXX", ("c++", "g++", "clang++"))):
        got = _cached_value(project_cache, f"CMAKE_{lang}_COMPILER")
        if got and Path(got).is_file():
            args.append(f"-DCMAKE_{lang}_COMPILER={got}")
        elif not (os.environ.get(env) or any(shutil.which(f) for f in fallbacks)):
            raise NakError(f"no {lang} compiler found to build upstream {COMPLETION}; install one "
                           "(Debian/Ubuntu: `apt-get install build-essential`) or set CC/CXX")
    return args


def compiled_ggml_files(files: list[str], backend: str) -> list[str]:
    """Which of ``files`` (paths in the llama.cpp tree that our patches change) the project's ggml
    build for ``backend`` (``cpu``, ``cuda``, ``vulkan``, ...: ``_build_info.json``) compiled:
    every ``ggml/`` file except those in the directory of a ggml backend not built in
    (``ggml/src/ggml-<name>/``; every build has ggml-cpu and ggml-rpc, ROCm compiles ggml-cuda's
    sources). A patch to ggml-vulkan alone leaves a CPU build's ggml upstream's."""
    built = {"cpu", "rpc", backend, *(("hip", "cuda") if backend == "rocm" else ())}
    out = []
    for f in files:
        m = re.match(r"ggml/src/ggml-([A-Za-z0-9]+)/", f)
        if f.startswith("ggml/") and (m is None or m.group(1).lower() in built):
            out.append(f)
    return out


def build_dir(own_ggml: bool = False) -> tuple[Path, Path, Path | None, list[str]]:
    """``(dir, pristine, ggml_dir, cmake_args)`` for the oracle's build without building it:
    ``dir`` is ``<cache>/llama.cpp/upstream-<key>``; ``ggml_dir`` the project's installed ggml
    package reused (None with ``own_ggml``). Raises NakError as :func:`pristine_source`, or when
    the project's llama.cpp build tree is gone."""
    pristine, meta = pristine_source()
    tree = Path(build_info()["llama_build_dir"])
    project_cache = tree / "CMakeCache.txt"
    if not project_cache.is_file():
        raise NakError(f"the llama.cpp build tree {tree} is missing (cache cleared?); {_REINSTALL}")
    ggml_touched = compiled_ggml_files(meta.get("files", []), build_info().get("backend", "cpu"))
    if ggml_touched and not own_ggml:
        raise NakError(f"our patches touch ggml ({', '.join(ggml_touched)}), so the project's compiled ggml "
                       "is not upstream's; build the oracle with own_ggml=True")
    args = list(_CMAKE_OPTIONS)
    # GGML_NATIVE as the project's build resolved it (its default depends on SOURCE_DATE_EPOCH)
    native = _cached_value(project_cache, "GGML_NATIVE") or "ON"
    args.append(f"-DGGML_NATIVE={native}")
    args += _compiler_args(project_cache)
    ggml_dir = None
    if not own_ggml:
        ggml_dir = tree / "install" / "lib" / "cmake" / "ggml"
        if not (ggml_dir / "ggml-config.cmake").is_file():
            raise NakError(f"{ggml_dir} has no ggml-config.cmake (the project's llama.cpp is not installed "
                           f"there); {_REINSTALL}, or build the oracle with own_ggml=True")
        args += ["-DLLAMA_USE_SYSTEM_GGML=ON", f"-Dggml_DIR={ggml_dir}"]
    key = hashlib.sha256(json.dumps([str(pristine), args]).encode()).hexdigest()[:12]
    return cache_dir() / "llama.cpp" / f"upstream-{key}", pristine, ggml_dir, args


def _stale(binary: Path, stamp: Path, ggml_dir: Path | None) -> bool:
    """The binary or its build stamp is missing, or a reused ggml library is newer than the stamp
    (``pip install .`` rebuilt the project's llama.cpp)."""
    if not binary.is_file() or not stamp.is_file():
        return True
    if ggml_dir is None:
        return False
    built = stamp.stat().st_mtime
    return any(a.stat().st_mtime > built for a in ggml_dir.parents[1].glob("*ggml*.a"))


def ensure_completion(own_ggml: bool = False, force: bool = False, progress: bool = True,
                      timeout_s: float = 3600.0) -> UpstreamBuild:
    """Build upstream ``llama-completion`` from the pristine pinned tree unless a current build is
    cached; returns an :class:`UpstreamBuild`. Safe when several processes call it at once: they
    take ``<dir>/.lock`` in turn and the later ones find the build done.

    ``own_ggml`` compiles ggml from the pristine tree too instead of linking the project's.
    The build log is ``<dir>/build.log``; progress lines go to stderr when ``progress``.
    Raises NakError when CMake, Ninja or a compiler is missing (naming what to install), when
    configuring or compiling fails (with the log's tail), or when it takes over ``timeout_s``
    seconds; the pristine tree is never written to."""
    dest, pristine, ggml_dir, args = build_dir(own_ggml)
    binary = dest / "build" / "bin" / COMPLETION
    stamp = dest / ".built"
    if not force and not _stale(binary, stamp, ggml_dir):
        return UpstreamBuild(binary, dest, pristine, ggml_dir)
    cmake = _tool("cmake", "cmake", "CMAKE_BIN_DIR")
    ninja = _tool("ninja", "ninja", "BIN_DIR")
    dest.mkdir(parents=True, exist_ok=True)
    log = dest / "build.log"
    t0 = time.monotonic()
    with _lock(dest, timeout_s):
        if not force and not _stale(binary, stamp, ggml_dir):  # another process built it meanwhile
            return UpstreamBuild(binary, dest, pristine, ggml_dir)
        if progress:
            print(f"nakshatra: building upstream {COMPLETION} from {pristine} into {dest} "
                  f"(first time a few minutes; log: {log})", file=sys.stderr, flush=True)
        (dest / "key.json").write_text(json.dumps({"pristine": str(pristine), "cmake_args": args}, indent=1) + "\n")
        with open(log, "w") as out:
            steps = (("configuring upstream llama.cpp",
                      [cmake, "-S", str(pristine), "-B", str(dest / "build"),
                       f"-DCMAKE_MAKE_PROGRAM={ninja}", *args]),
                     (f"building {COMPLETION}", [cmake, "--build", str(dest / "build"), "--target", COMPLETION]))
            for what, argv in steps:
                out.write(f"$ {shlex.join(argv)}\n")
                out.flush()
                left = timeout_s - (time.monotonic() - t0)
                try:
                    rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        timeout=max(1.0, left)).returncode
                except subprocess.TimeoutExpired:
                    raise NakError(f"{what} took over {timeout_s:.0f} s (log: {log}); "
                                   "check the machine's load and run again") from None
                if rc:
                    out.flush()
                    raise NakError(f"{what} failed (full log: {log}):\n{_tail(log, 30)}\n"
                                   "fix the cause above (a missing compiler or CMake is named there), "
                                   "or pass own_ggml=True if linking the project's ggml is what failed")
        if not binary.is_file():
            raise NakError(f"the build finished but {binary} is missing (log: {log})")
        stamp.write_text(f"{time.time()}\n")
    built_s = time.monotonic() - t0
    if progress:
        print(f"nakshatra: built upstream {COMPLETION} in {built_s:.0f} s", file=sys.stderr, flush=True)
    return UpstreamBuild(binary, dest, pristine, ggml_dir, built_s)


_PROMPT_HEADER = re.compile(r"number of tokens in prompt = (\d+)\n")
_TOKEN_LINE = re.compile(r"^ *(-?\d+) -> '", re.MULTILINE)
_EOG_TAIL = b" [end of text]\n"


def parse_output(stdout: bytes, stderr: str) -> tuple[bytes, bool, list[int]]:
    """Split llama-completion's output (``-no-cnv --no-display-prompt --verbose-prompt``) into
    ``(generated bytes, stopped at end-of-generation, prompt token ids)``.

    stdout is each generated token's piece, then `` [end of text]\\n`` if it stopped at an
    end-of-generation token, then ``\\n\\n`` (tools/completion/completion.cpp); the prompt's
    tokens are the ``%6d -> '%s'`` lines after ``number of tokens in prompt = N`` on stderr.
    Raises NakError when either does not have that shape."""
    if not stdout.endswith(b"\n\n"):
        raise NakError(f"{COMPLETION} printed an unexpected ending {stdout[-40:]!r}; is it the pinned version?")
    data = stdout[:-2]
    eog = data.endswith(_EOG_TAIL)
    if eog:
        data = data[:-len(_EOG_TAIL)]
    m = _PROMPT_HEADER.search(stderr)
    if not m:
        raise NakError(f"{COMPLETION} did not list the prompt's tokens (--verbose-prompt):\n{stderr[-2000:]}")
    n = int(m.group(1))
    tokens = [int(t) for t in _TOKEN_LINE.findall(stderr, m.end())[:n]]
    if len(tokens) != n:
        raise NakError(f"{COMPLETION} announced {n} prompt tokens but listed {len(tokens)}")
    return data, eog, tokens


def complete(model: Path, prompt: str, n_predict: int, *, n_ctx: int = 4096, n_batch: int = 2048,
             n_ubatch: int = DEFAULT_N_UBATCH, threads: int = 0, swa_full: bool = True,
             flash_attn: str = "auto", ignore_eos: bool = False, timeout_s: float = 300.0,
             extra_args: Sequence[str] = (), build: UpstreamBuild | None = None) -> UpstreamResult:
    """Generate greedily with upstream llama-completion (built first if needed) from raw text.

    Runs ``llama-completion -m MODEL -bf PROMPTFILE -n N --temp 0 -s 0 -no-cnv
    --no-display-prompt --verbose-prompt --no-warmup --simple-io --color off --fit off
    --no-log-prefix --no-log-timestamps --log-colors off -c n_ctx
    -b n_batch -ub n_ubatch -t/-tb threads -fa flash_attn [--swa-full] [--ignore-eos]`` with stdin
    from /dev/null and ``LLAMA_ARG_*`` removed from its environment. The prompt goes in as exact
    bytes (``-bf``; ``-f`` would drop a trailing newline) and is tokenised by the tool with
    ``add_special = true`` (BOS as the vocabulary says) and ``parse_special = true``: that equals
    :meth:`nakshatra.client.chain.Chain.generate`'s raw mode (``parse_special = False``) unless the text
    spells a special token such as ``<|im_start|>``; compare ``prompt_tokens`` to be sure.

    To be comparable with a chain, pass the chain's prefill chunk as ``n_batch``
    (:data:`nakshatra.client.chain.DEFAULT_N_BATCH`), the stages' ``n_ubatch`` (512), their per-session
    context as ``n_ctx`` (tokens) and their thread count; ``swa_full`` as the stages run
    (cpp/stage/stage.cpp keeps the full sliding-window cache so KV roll-back is exact).
    ``threads`` 0: all cores. ``timeout_s``: wall-clock seconds for the run.

    Raises NakError on bad arguments, a missing model, a failed or timed-out run (with the tail
    of its log), or output of an unexpected shape."""
    model = Path(model)
    if not model.is_file():
        raise NakError(f"model {model} does not exist; pass a GGUF file (`nak pull` fetches one)")
    if not prompt:
        raise NakError("the prompt is empty; pass some text")
    if n_predict < 1 or n_ctx < 8 or n_batch < 1 or not 1 <= n_ubatch <= n_batch or threads < 0:
        raise NakError(f"complete needs n_predict >= 1, n_ctx >= 8, 1 <= n_ubatch <= n_batch and threads >= 0 "
                       f"(got n_predict={n_predict}, n_ctx={n_ctx}, n_batch={n_batch}, n_ubatch={n_ubatch}, "
                       f"threads={threads})")
    if flash_attn not in ("auto", "on", "off"):
        raise NakError(f"flash_attn {flash_attn!r}: use auto, on or off")
    if timeout_s <= 0:
        raise NakError(f"timeout_s must be positive, got {timeout_s}")
    build = build or ensure_completion()
    threads = threads or (os.cpu_count() or 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    with tempfile.TemporaryDirectory(prefix="nak-upstream-") as td:
        pfile = Path(td) / "prompt.txt"
        pfile.write_bytes(prompt.encode("utf-8"))
        argv = [str(build.binary), "-m", str(model), "-bf", str(pfile), "-n", str(n_predict),
                "--temp", "0", "-s", "0", "-no-cnv", "--no-display-prompt", "--verbose-prompt",
                "--no-warmup", "--simple-io", "--color", "off", "--fit", "off",
                "--no-log-prefix", "--no-log-timestamps", "--log-colors", "off",
                "-c", str(n_ctx), "-b", str(n_batch), "-ub", str(n_ubatch),
                "-t", str(threads), "-tb", str(threads), "-fa", flash_attn]
        if swa_full:
            argv.append("--swa-full")
        if ignore_eos:
            argv.append("--ignore-eos")
        argv += list(extra_args)
        t0 = time.monotonic()
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired as e:
            tail = "\n".join((e.stderr or b"").decode(errors="replace").splitlines()[-15:])
            raise NakError(f"{COMPLETION} did not finish within {timeout_s:.0f} s (killed):\n{tail}\n"
                           "raise timeout_s for a long prompt or a slow machine") from None
        seconds = time.monotonic() - t0
    stderr = r.stderr.decode("utf-8", errors="replace")
    if r.returncode != 0:
        tail = "\n".join(stderr.splitlines()[-20:])
        raise NakError(f"{COMPLETION} exited with status {r.returncode}:\n{tail}\ncommand: {shlex.join(argv)}")
    data, eog, prompt_tokens = parse_output(r.stdout, stderr)
    return UpstreamResult(data, data.decode("utf-8", errors="replace"), prompt_tokens, eog, argv, stderr, seconds)
