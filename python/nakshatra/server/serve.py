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
from pathlib import Path

from ..errors import NakError, SliceError
from ..ranges import LayerRange, parse_range
from .options import FLASH_ATTN, WIRE_FORMATS, ServeOptions, add_arguments, from_namespace, stage_kwargs

__all__ = ["ServeOptions", "WIRE_FORMATS", "serve", "main", "resolve_slice", "check_host"]

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


def slice_for(opts: ServeOptions, key: bytes | None, progress: bool) -> tuple[Path, str]:
    """The slice file a stage with ``opts`` loads and the whole model's sha256: fetched by range
    requests for a remote model (:func:`remote_slice`), downloaded whole for a hub or built-in name,
    fetched from ``opts.fetch`` when the slice file is missing, then :func:`resolve_slice` (cut,
    verified). Raises NakError / SliceError naming the file and the fix."""
    model = remote_slice(opts, key, progress) or local_model(opts.model, progress)
    if model == Path(opts.model) and (opts.fetch or opts.sha256):  # fetch a missing slice (nakshatra.cluster.fetch)
        from ..cluster.fetch import fetch_slice

        fetch_slice(opts.fetch, model, opts.sha256, key=key)
    return resolve_slice(model, opts.layers, opts.verify, progress=progress)


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
    if opts.flash_attn not in FLASH_ATTN:
        raise NakError(f"--flash-attn {opts.flash_attn!r}: use auto, on or off")
    tty = sys.stderr.isatty()
    path, model_sha = slice_for(opts, key, tty)
    from contextlib import nullcontext

    from rich.console import Console

    loading = Console(stderr=True).status(f"loading {path.name} into llama.cpp ...") if tty else nullcontext()
    try:
        with loading:
            stage = _nakshatra.Stage(str(path), **{**stage_kwargs(opts), "model_sha256": model_sha})
    except StageError as e:
        raise NakError(f"cannot load {path}: {e}") from None
    info = stage.info()
    rng = LayerRange(info["layer_start"], info["layer_end"])
    kv = kv_bytes_estimate(path, opts.ctx, opts.max_sessions, opts.swa_full)
    # announce on the LAN (DNS-SD over mDNS) by default only off loopback: a loopback stage is
    # reachable from this machine alone, so it announces only when asked (--announce)
    announce = opts.announce if opts.announce is not None else not _nakshatra.is_loopback(opts.host)
    announcers = []
    bound: list[int] = []

    def on_ready(port: int) -> None:
        bound.append(port)
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

    def on_swap(active: dict) -> None:
        print(f"nak serve: swapped to layers {active.get('layers')} of {active.get('model')} "
              f"({active.get('arch')}, {active.get('path')})", file=sys.stderr, flush=True)
        if announcers and bound:  # announce the model served now: the old record's sha and range are stale
            import threading

            from ..cluster.discovery import announce_stage

            def reannounce() -> None:  # mDNS probes take a while: not on the event loop's thread
                for a in announcers:
                    if a is not None:
                        a.close()
                announcers.clear()
                announcers.append(announce_stage(opts.host, bound[0], active["model_sha256"],
                                                 LayerRange(active["layer_start"], active["layer_end"]),
                                                 active["n_layer_full"], active["arch"], bool(key),
                                                 Path(str(active["model"])).name))

            threading.Thread(target=reannounce, daemon=True, name="nak-announce").start()

    control = None
    if opts.swap:
        from .swap import SwapController

        control = SwapController(stage, opts, key, {"model": str(opts.model), "layers": opts.layers or rng.inclusive(),
                                                    "model_sha256": model_sha, "path": str(path),
                                                    "layer_start": rng.start, "layer_end": rng.end,
                                                    "n_layer_full": info["n_layer_full"], "arch": info["arch"]},
                                  on_swap=on_swap)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # as llama-server: Ctrl-C stops a stage even when it was started from a shell that ignores
    # SIGINT for background jobs (POSIX sh does, for `nak serve ... &`)
    signal.signal(signal.SIGINT, on_term)
    try:
        stage.serve(opts.host, opts.port, on_ready, max_payload=opts.max_frame_mb << 20, key=key or b"",
                    insecure=opts.insecure, control=control)
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
    add_arguments(ap)  # the flags of nak serve, from ServeOptions
    opts = from_namespace(ap.parse_args(argv))
    try:
        return serve(opts)
    except (NakError, SliceError) as e:
        print(f"nak serve: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
