"""``nak serve``: load one slice into the C++ stage and run its event loop.

Also runnable as ``python -m nakshatra.server.serve`` (what local launchers spawn). Python only checks
the inputs, loads, prints the ready line and hands over to C++; no Python runs per request.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import NakError, SliceError
from ..ranges import LayerRange, parse_range

# hidden-state wire formats (cpp/protocol/wire.h): f32 exact; bf16 and q8r (per-row scaled int8) lossy
WIRE_FORMATS = ("f32", "bf16", "q8r")


@dataclass
class ServeOptions:
    """Options of one stage. ``ctx`` is the KV positions per session; the stage's n_ctx is
    ``ctx * max_sessions``. ``max_batch``: session steps the first stage decodes together (1:
    batching off). ``wire``: format of the hidden states this stage sends (WIRE_FORMATS).
    ``batch_log``: a file that gets one JSON line per decoded batch (for replays). ``cpu_lock``: a
    file that stages sharing one machine lock around each llama_decode, so they take turns with
    every core instead of spinning against each other (nakshatra.server.local sets it)."""

    model: Path | str  # a file, or the http(s) URL of a whole model (with layers: fetch just those)
    layers: str | None = None
    host: str = "127.0.0.1"
    port: int = 7071
    insecure: bool = False
    key_file: str = ""  # cluster key (``nak keygen``); empty: $NAK_KEY, else none
    threads: int = 0
    threads_batch: int = 0
    ctx: int = 4096
    max_sessions: int = 8
    n_gpu_layers: int = -1
    flash_attn: str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    verify: bool = True
    ready_json: bool = False
    max_batch: int = 8
    wire: str = "f32"
    batch_log: str = ""
    poll: int = 0
    cpu_strict: bool = False
    cpu_lock: str = ""
    batch_hold_ms: int = 0
    no_repack: bool = False  # llama.cpp use_extra_bufts = false: no repacked copy of the weights
    mlock: bool = False      # lock the weights in RAM (mmap + mlock)
    swa_full: bool = False   # sliding-window layers keep the whole context's KV (llama.cpp --swa-full)
    idle_timeout_s: int = 600
    max_frame_mb: int = 64
    fetch: tuple[str, ...] = ()  # URLs (mirrors) to fetch a missing slice from (nak up's file server)
    sha256: str = ""  # hex sha256 of the whole slice file: checked before serving (and after fetching)
    model_sha256: str = ""  # a remote model's sha256, when its server does not tell it
    announce: bool | None = None  # LAN discovery (nakshatra.cluster.discovery); None: unless host is loopback


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def resolve_slice(model: Path, layers: str | None, verify: bool = True, progress: bool = False) -> tuple[Path, str]:
    """The file a stage loads and the whole model's sha256.

    A slice is served as is (``layers``, if given, must match it; its tensor data is verified
    against its metadata). A whole model (a file, or any shard of a split model) is served whole
    (a split model from shard 1), or, with ``layers``, cut to that inclusive range on the fly and
    cached (a split model's slice is the unsplit model's). Raises NakError naming the file and
    the fix.
    """
    from ..gguf.slicer import cached_slice, model_layout, read_slice_meta, verify_slice

    if not model.is_file():
        raise NakError(f"{model}: no such file; give a slice from `nak slice` or a whole GGUF")
    meta = read_slice_meta(model)
    want = parse_range(layers) if layers else None
    if meta.get("nakshatra.layer_range_start") is not None:
        have = LayerRange(int(meta["nakshatra.layer_range_start"]), int(meta["nakshatra.layer_range_end"]))
        if want is not None and want != have:
            raise NakError(f"{model} holds layers {have}, not {want}; drop --layers or pick the "
                           "slice for that range")
        if verify:
            verify_slice(model, progress=progress)
            check_against_manifest(model, meta)
        return model, str(meta.get("nakshatra.model_sha256") or "")
    layout = model_layout(model, progress=progress)
    if want is None:
        return layout.path, layout.sha256
    if want.end > layout.n_layer:
        raise NakError(f"--layers {want.inclusive()} is beyond the model's {layout.n_layer} "
                       f"layers (0-{layout.n_layer - 1})")
    return cached_slice(model, want, layout.n_layer), layout.sha256


def check_against_manifest(path: Path, meta: dict) -> None:
    """If a ``*.manifest.json`` beside the slice lists it, the slice must be the one the manifest
    recorded (same layer range, model and tensor-data sha256). Raises NakError naming the file,
    the manifest and the fix; a slice with no manifest beside it passes."""
    from ..gguf.manifest import Manifest

    for mpath in sorted(path.parent.glob("*.manifest.json")):
        try:
            m = Manifest.load(mpath)
        except Exception:  # an unreadable manifest is not this slice's; the slice carries its own hash
            continue
        for info in m.slices:
            if info.file != path.name:
                continue
            want = (info.layer_start, info.layer_end, m.model.get("sha256"), info.tensor_data_sha256)
            have = (int(meta["nakshatra.layer_range_start"]), int(meta["nakshatra.layer_range_end"]),
                    meta.get("nakshatra.model_sha256"), meta.get("nakshatra.tensor_data_sha256"))
            if want != have:
                raise NakError(f"{path} is not the slice {mpath.name} recorded (layers, model or data sha256 "
                               "differ): the file was replaced or the manifest is stale; re-run nak slice")


def kv_bytes_estimate(path: Path, ctx: int, max_sessions: int = 1, swa_full: bool = False) -> int | None:
    """KV cache bytes of the layers in ``path`` (f16) for ``max_sessions`` sessions of ``ctx``
    tokens (nakshatra.gguf.inspection.inspect_gguf), or None."""
    try:
        from ..gguf.inspection import inspect_gguf

        return int(inspect_gguf(path, n_ctx=ctx, max_sessions=max_sessions, swa_full=swa_full)["kv_bytes"])
    except Exception:  # an estimate only: never block serving on it
        return None


def remote_slice(opts: ServeOptions, key: bytes | None, progress: bool) -> Path | None:
    """For a model given as an http(s) URL, or as an ``hf:`` reference that is not in the Hugging
    Face cache yet: its slice of ``opts.layers``, fetched by range requests
    (:func:`nakshatra.gguf.remote.fetch_slice`; with ``key``, the :func:`nakshatra.cluster.fileserver.fetch_token`
    ``nak up``'s file server wants). None for a local model (a file, a cached ``hf:`` model, an
    ``ollama:`` one). Raises NakError without --layers, or as fetch_slice and
    :func:`nakshatra.gguf.hub.hf_remote_files`."""
    from ..gguf import hub
    from ..gguf.remote import RemoteFile, fetch_slice, is_url

    model = str(opts.model)
    if not is_url(model) and not (model.startswith(hub.HF_PREFIX) and opts.layers and hub.cached_hf(model) is None):
        return None
    if not opts.layers:
        raise NakError(f"{model} is a remote model: give --layers A-B, the layers this stage serves "
                       "(it fetches only those)")
    if opts.fetch:
        raise NakError("--fetch is for a slice file; a remote model is fetched from its own URL: drop --fetch")
    if is_url(model):
        files = [RemoteFile(model)]
        if key:
            from ..cluster.fileserver import AUTH_HEADER, fetch_token

            files = [RemoteFile(model, {AUTH_HEADER: fetch_token(key, files[0].name)})]
    else:
        files = [RemoteFile(f.url, f.headers, f.size, f.sha256) for f in hub.hf_remote_files(model)]
    got = fetch_slice(files, parse_range(opts.layers), model_sha256=opts.model_sha256 or None,
                      sha256=opts.sha256 or None, progress=progress)
    print(f"nak serve: layers {opts.layers} of {model}: {got.path} (fetched {_fmt_bytes(got.downloaded)})",
          file=sys.stderr, flush=True)
    return got.path


def local_model(model: Path | str, progress: bool) -> Path:
    """The file a model argument names: a path as is; an ``hf:`` / ``ollama:`` reference or a
    built-in name (no such file) resolved by :func:`nakshatra.gguf.models.resolve_model` (downloaded
    whole when not cached)."""
    from ..gguf.hub import is_ref
    from ..gguf.models import BUILTIN, resolve_model

    if is_ref(model) or (str(model) in BUILTIN and not Path(model).exists()):
        return resolve_model(str(model), progress=progress)
    return Path(model)


def check_host(host: str, insecure: bool, key: bytes | None = None) -> None:
    """A stage listens on a non-loopback address only with a cluster key, or with ``--insecure``
    (then it warns loudly)."""
    from .. import _nakshatra

    if _nakshatra.is_loopback(host) or key:
        return
    if not insecure:
        raise NakError(f"--host {host} is not loopback and this stage has no cluster key: anyone who "
                       "reaches the port could use it. Make a key with `nak keygen -o cluster.key` and "
                       "pass --key-file cluster.key (or set NAK_KEY) on every stage and client, or add "
                       "--insecure to accept that")
    print(f"nak serve: WARNING: listening on {host} WITHOUT AUTHENTICATION (--insecure); anyone who "
          "reaches this port can run the model and read what it computes. Use --key-file.",
          file=sys.stderr)


def serve(opts: ServeOptions) -> int:
    """Load the stage and serve until SIGINT/SIGTERM. Returns the exit code (0 on a clean stop).

    Raises NakError for bad input (file, range, host, options) before anything is loaded.
    """
    from .. import _nakshatra
    from ..auth import load_key
    from ..errors import StageError

    key = load_key(opts.key_file)
    check_host(opts.host, opts.insecure, key)
    if opts.ctx < 1 or opts.max_sessions < 1:
        raise NakError("--ctx and --max-sessions must be at least 1")
    if not 0 <= opts.port < 65536:
        raise NakError(f"--port {opts.port} must be in 0..65535 (0: any free port)")
    if opts.idle_timeout_s < 1 or not 1 <= opts.max_frame_mb <= 4095:
        raise NakError("--idle-timeout must be >= 1 s and --max-frame-mb in 1..4095")
    if not 0 <= opts.poll <= 100:
        raise NakError(f"--poll {opts.poll} must be in 0..100 (0: idle threads sleep)")
    if opts.max_batch < 1:
        raise NakError(f"--max-batch {opts.max_batch} must be at least 1 (1 turns batching off)")
    if opts.wire not in WIRE_FORMATS:
        raise NakError(f"--wire {opts.wire!r}: use one of {', '.join(WIRE_FORMATS)} (f32 is exact)")
    fa = {"auto": -1, "off": 0, "on": 1}.get(opts.flash_attn)
    if fa is None:
        raise NakError(f"--flash-attn {opts.flash_attn!r}: use auto, on or off")
    tty = sys.stderr.isatty()
    model = remote_slice(opts, key, tty) or local_model(opts.model, tty)
    if model == Path(opts.model) and (opts.fetch or opts.sha256):  # fetch a missing slice (nakshatra.cluster.fetch)
        from ..cluster.fetch import fetch_slice

        fetch_slice(opts.fetch, model, opts.sha256, key=key)
    path, model_sha = resolve_slice(model, opts.layers, opts.verify, progress=tty)
    from contextlib import nullcontext

    from rich.console import Console

    loading = Console(stderr=True).status(f"loading {path.name} into llama.cpp ...") if tty else nullcontext()
    try:
        with loading:
            stage = _nakshatra.Stage(str(path), model_sha256=model_sha, n_ctx=opts.ctx,
                                     max_sessions=opts.max_sessions, n_threads=opts.threads,
                                     n_threads_batch=opts.threads_batch,
                                     n_gpu_layers=opts.n_gpu_layers, flash_attn=fa,
                                     cache_type_k=opts.cache_type_k, cache_type_v=opts.cache_type_v,
                                     max_batch=opts.max_batch, wire=opts.wire, batch_log=opts.batch_log,
                                     poll=opts.poll, cpu_strict=opts.cpu_strict, cpu_lock=opts.cpu_lock,
                                     batch_hold_ms=opts.batch_hold_ms, idle_timeout_s=opts.idle_timeout_s,
                                     no_repack=opts.no_repack, mlock=opts.mlock, swa_full=opts.swa_full)
    except StageError as e:
        raise NakError(f"cannot load {path}: {e}") from None
    info = stage.info()
    rng = LayerRange(info["layer_start"], info["layer_end"])
    kv = kv_bytes_estimate(path, opts.ctx, opts.max_sessions, opts.swa_full)
    # announce on the LAN (DNS-SD over mDNS) by default only off loopback: a loopback stage is
    # reachable from this machine alone, so it announces only when asked (--announce)
    announce = opts.announce if opts.announce is not None else not _nakshatra.is_loopback(opts.host)
    announcers = []

    def on_ready(port: int) -> None:
        kv_txt = f", KV {_fmt_bytes(kv)} for {opts.max_sessions} x {opts.ctx} tokens" if kv else ""
        print(f"nak serve: ready on {opts.host}:{port} · layers {rng} of {info['n_layer_full']} · "
              f"{info['arch']} n_embd {info['n_embd']} · RSS {_fmt_bytes(info['rss_bytes'])} "
              f"({_fmt_bytes(info['health']['rss_anon_bytes'])} own, {_fmt_bytes(info['health']['rss_file_bytes'])} "
              f"file-backed){kv_txt}",
              file=sys.stderr, flush=True)
        if opts.ready_json:
            print(json.dumps({"host": opts.host, "port": port, "layer_start": rng.start,
                              "layer_end": rng.end, "pid": os.getpid()}), flush=True)
        if announce:
            from ..cluster.discovery import announce_stage

            announcers.append(announce_stage(opts.host, port, model_sha, rng, info["n_layer_full"], info["arch"],
                                             bool(key), Path(opts.model).name))

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # as llama-server: Ctrl-C stops a stage even when it was started from a shell that ignores
    # SIGINT for background jobs (POSIX sh does, for `nak serve ... &`)
    signal.signal(signal.SIGINT, on_term)
    try:
        stage.serve(opts.host, opts.port, on_ready, max_payload=opts.max_frame_mb << 20, key=key or b"",
                    insecure=opts.insecure)
    except KeyboardInterrupt:
        print("nak serve: stopped", file=sys.stderr)
        return 0
    except StageError as e:
        raise NakError(f"cannot serve on {opts.host}:{opts.port}: {e} (is the port in use?)") from None
    finally:
        for a in announcers:  # an mDNS goodbye: browsers drop this stage at once
            if a is not None:
                a.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m nakshatra.server.serve MODEL [--layers A-B] [--port N] ...`` (see ServeOptions)."""
    ap = argparse.ArgumentParser(prog="python -m nakshatra.server.serve", description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--layers")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7071)
    ap.add_argument("--insecure", action="store_true")
    ap.add_argument("--key-file", default="")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--threads-batch", type=int, default=0)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--max-sessions", type=int, default=8)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--flash-attn", default="auto")
    ap.add_argument("--cache-type-k", default="f16")
    ap.add_argument("--cache-type-v", default="f16")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--ready-json", action="store_true")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--wire", default="f32")
    ap.add_argument("--batch-log", default="")
    ap.add_argument("--poll", type=int, default=0)
    ap.add_argument("--cpu-strict", type=int, default=0)
    ap.add_argument("--cpu-lock", default="")
    ap.add_argument("--batch-hold-ms", type=int, default=0)
    ap.add_argument("--no-repack", action="store_true")
    ap.add_argument("--mlock", action="store_true")
    ap.add_argument("--swa-full", action="store_true")
    ap.add_argument("--idle-timeout", type=int, default=600)
    ap.add_argument("--max-frame-mb", type=int, default=64)
    ap.add_argument("--fetch", action="append", default=[])
    ap.add_argument("--sha256", default="")
    ap.add_argument("--model-sha256", default="")
    ap.add_argument("--announce", action=argparse.BooleanOptionalAction, default=None)
    a = ap.parse_args(argv)
    opts = ServeOptions(model=a.model, layers=a.layers, host=a.host, port=a.port, insecure=a.insecure,
                        key_file=a.key_file,
                        threads=a.threads, threads_batch=a.threads_batch, ctx=a.ctx, max_sessions=a.max_sessions,
                        n_gpu_layers=a.n_gpu_layers, flash_attn=a.flash_attn,
                        cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v,
                        verify=not a.no_verify, ready_json=a.ready_json, max_batch=a.max_batch,
                        wire=a.wire, batch_log=a.batch_log, poll=a.poll, cpu_strict=bool(a.cpu_strict),
                        cpu_lock=a.cpu_lock, batch_hold_ms=a.batch_hold_ms, idle_timeout_s=a.idle_timeout,
                        no_repack=a.no_repack, mlock=a.mlock, swa_full=a.swa_full,
                        max_frame_mb=a.max_frame_mb, announce=a.announce, fetch=tuple(a.fetch), sha256=a.sha256,
                        model_sha256=a.model_sha256)
    try:
        return serve(opts)
    except (NakError, SliceError) as e:
        print(f"nak serve: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
