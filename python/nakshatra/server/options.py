"""A stage's options, defined once: :class:`ServeOptions`.

Every layer derives from this one dataclass: ``nak serve`` (its Typer signature is built from the
fields, ``cli/nakshatra_cli/cmd_serve.py``), ``python -m nakshatra.server.serve`` (argparse, built
by :func:`add_arguments`), the stage options a cluster file's ``[options]`` may set (``nak up``,
:func:`cluster_flags`) and the keyword arguments of the C++ stage (:func:`stage_kwargs`). The
defaults of the options the C++ stage takes are not written here: they are read from a
default-constructed ``_nakshatra.StageParams`` (``cpp/stage/stage.h: nak_stage_params``).

Adding an option: add a field with :func:`_opt` (its flags, help, and ``engine=`` the
``StageParams`` field it sets, if any); ``nak serve``, ``python -m nakshatra.server.serve`` and, with
``cluster=True``, the cluster file get it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _nakshatra

_STAGE = _nakshatra.StageParams()  # the C++ stage's defaults

FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
"""``--flash-attn`` values and the ``StageParams.flash_attn`` each sets."""

WIRE_FORMATS = ("f32", "bf16", "q8r")
"""Hidden-state wire formats (cpp/protocol/wire.h): f32 exact; bf16 and q8r (per-row scaled int8) lossy."""


def _opt(default: Any, *flags: str, help: str, engine: str | None = None, cluster: bool = False,
         envvar: str | None = None, negative: str | None = None) -> Any:
    """A ServeOptions field: ``flags`` (long first, then short ones; none: the positional
    argument), ``help``, ``engine`` (the ``StageParams`` field it sets), ``cluster`` (a cluster
    file's ``[options]`` may set it, by the long flag's name with ``_``), ``envvar`` (read when the
    flag is not given), ``negative`` (a bool flag that sets it False, e.g. ``--no-verify``)."""
    # the positional argument (no flags) is required: dataclasses.MISSING, no default
    meta = {"flags": flags, "help": help, "engine": engine, "cluster": cluster, "envvar": envvar,
            "negative": negative}
    return field(default=default, metadata=meta)


def _engine_default(name: str) -> Any:
    return getattr(_STAGE, name)


@dataclass
class ServeOptions:
    """Options of one stage (``nak serve``). ``ctx`` is the KV positions per session; the stage's
    n_ctx is ``ctx * max_sessions``. Defaults of the fields with ``engine`` metadata come from the
    C++ stage (``_nakshatra.StageParams()``)."""

    model: Path | str = _opt(dataclasses.MISSING, help="A slice from nak slice, a whole GGUF (with --layers to cut it), or the "
                             "http(s) URL of a whole GGUF (with --layers: fetches only those layers' bytes).")
    layers: str | None = _opt(None, "--layers", "-l", help="Inclusive layer range, e.g. 0-15.")
    host: str = _opt("127.0.0.1", "--host", help="Address to listen on.")
    port: int = _opt(7071, "--port", help="TCP port (0: any free port).")
    insecure: bool = _opt(False, "--insecure", help="Without a cluster key: allow listening on a non-loopback "
                          "address (warns) and forwarding to non-loopback next stages (refused otherwise).")
    key_file: str = _opt("", "--key-file", help="Cluster key from `nak keygen` (default: $NAK_KEY, hex, if set): "
                         "both ends authenticate, every frame is MACed.")
    threads: int = _opt(_engine_default("n_threads"), "--threads", "-t", engine="n_threads", cluster=True,
                        envvar="NAK_THREADS", help="llama.cpp threads for decode (0: all cores).")
    ctx: int = _opt(_engine_default("n_ctx"), "--ctx", "-c", engine="n_ctx", cluster=True,
                    help="KV positions per session (the stage's n_ctx is ctx x max-sessions).")
    threads_batch: int = _opt(_engine_default("n_threads_batch"), "--threads-batch", "-tb", engine="n_threads_batch",
                              cluster=True, help="Threads for prefill (0: as --threads).")
    max_sessions: int = _opt(_engine_default("max_sessions"), "--max-sessions", engine="max_sessions", cluster=True,
                             help="Concurrent sessions, each with its own KV.")
    n_gpu_layers: int = _opt(_engine_default("n_gpu_layers"), "--n-gpu-layers", "-ngl", engine="n_gpu_layers",
                             cluster=True, help="Layers to offload (GPU backends; -1 all).")
    devices: str = _opt(_engine_default("devices"), "--device", "-dev", engine="devices", cluster=True,
                        help="As llama.cpp's --device: GPUs to use by name, comma-separated (CUDA0,CUDA1); "
                        "'none': the CPU alone; default: every GPU of this build.")
    flash_attn: str = _opt({v: k for k, v in FLASH_ATTN.items()}[_engine_default("flash_attn")], "--flash-attn", "-fa",
                           engine="flash_attn", cluster=True, help="auto, on or off.")
    cache_type_k: str = _opt(_engine_default("cache_type_k"), "--cache-type-k", "-ctk", engine="cache_type_k",
                             cluster=True, help="KV cache type of K (f16, q8_0, ...).")
    cache_type_v: str = _opt(_engine_default("cache_type_v"), "--cache-type-v", "-ctv", engine="cache_type_v",
                             cluster=True, help="KV cache type of V (f16, q8_0, ...).")
    verify: bool = _opt(True, negative="--no-verify",
                        help="Check a slice's tensor data against its metadata before serving (--no-verify skips it).")
    ready_json: bool = _opt(False, "--ready-json", help="Also print the ready line as JSON on stdout.")
    max_batch: int = _opt(_engine_default("max_batch"), "--max-batch", engine="max_batch", cluster=True,
                          help="First stage: session steps decoded together (1: no batching).")
    wire: str = _opt(_engine_default("wire"), "--wire", engine="wire", cluster=True,
                     help="Hidden states sent as f32 (exact), bf16 or q8r (per-row int8).")
    batch_log: str = _opt(_engine_default("batch_log"), "--batch-log", engine="batch_log",
                          help="Append one JSON line per decoded batch to this file.")
    no_repack: bool = _opt(_engine_default("no_repack"), "--no-repack", engine="no_repack",
                           help="Keep the weights in their mmap'd pages only: no repacked copy for faster CPU "
                           "matmuls (about half the resident memory; decode cost: nak bench --no-repack).")
    mlock: bool = _opt(_engine_default("mlock"), "--mlock", engine="mlock",
                       help="Lock the weights in RAM (never swapped or compressed), as llama.cpp's --mlock.")
    swa_full: bool = _opt(_engine_default("swa_full"), "--swa-full", engine="swa_full",
                          help="Sliding-window layers (Gemma 2/3, ...) keep the whole context's KV, as llama.cpp's "
                          "--swa-full, instead of the window plus one ubatch: rolling a session back further than "
                          "that then needs no re-prefill, at far more memory (nak inspect shows both).")
    batch_hold_ms: int = _opt(_engine_default("batch_hold_ms"), "--batch-hold-ms", engine="batch_hold_ms", cluster=True,
                              help="First stage, ring: hold a step up to this long for sessions due back, so they "
                              "travel as one batch (0: never).")
    poll: int = _opt(_engine_default("poll"), "--poll", engine="poll", cluster=True,
                     help="Thread-pool polling 0..100 as llama.cpp's --poll (0: idle threads sleep).")
    cpu_strict: int = _opt(int(_engine_default("cpu_strict")), "--cpu-strict", engine="cpu_strict",
                           help="1: pin thread i to CPU i (llama.cpp's --cpu-strict).")
    cpu_lock: str = _opt(_engine_default("cpu_lock"), "--cpu-lock", engine="cpu_lock",
                         help="A file that stages sharing this machine lock around each decode (they take turns; "
                         "nakshatra.server.local sets it).")
    idle_timeout_s: int = _opt(_engine_default("idle_timeout_s"), "--idle-timeout", engine="idle_timeout_s",
                               cluster=True, help="Free a session idle this many seconds.")
    max_frame_mb: int = _opt(64, "--max-frame-mb", cluster=True, help="Largest frame accepted, MiB.")
    fetch: tuple[str, ...] = _opt((), "--fetch", help="If the slice is missing, download it from this URL (nak up "
                                  "prints it; repeat for mirrors) and check it before serving.")
    sha256: str = _opt("", "--sha256", help="The slice file's sha256 (hex): required with --fetch, checked before "
                       "serving (and, for a remote model, the slice cut from what was fetched).")
    model_sha256: str = _opt("", "--model-sha256",
                             help="A remote model's sha256 (hex), when its server does not send it as the ETag.")
    swap: bool = _opt(True, negative="--no-swap",
                      help="Let an authenticated client (nak api's model swap) load another model's slice beside this "
                      "one and switch to it in place (--no-swap refuses).")
    announce: bool | None = _opt(None, "--announce", negative="--no-announce",
                                 help="Announce this stage on the LAN (mDNS, _nakshatra._tcp) for nak run --discover "
                                 "(default: only when --host is not loopback).")


DEFAULTS = ServeOptions(model="")
"""Every option at its default (``DEFAULTS.ctx``, ``DEFAULTS.max_sessions``, ...), for the layers
that start stages with a subset of the options (``nak run``'s local stages, ``nak api``)."""


def option_fields() -> list[dataclasses.Field]:
    """The fields of :class:`ServeOptions` in ``nak serve --help`` order (``model`` first)."""
    return list(dataclasses.fields(ServeOptions))


def stage_kwargs(opts: ServeOptions) -> dict[str, Any]:
    """The keyword arguments of ``_nakshatra.Stage`` for ``opts``: every field with ``engine``
    metadata under its ``StageParams`` name (``flash_attn`` as -1/0/1, ``cpu_strict`` as a bool).
    Raises KeyError for a ``flash_attn`` outside :data:`FLASH_ATTN` (serve() checks it first)."""
    out: dict[str, Any] = {}
    for f in option_fields():
        name = f.metadata["engine"]
        if name:
            v = getattr(opts, f.name)
            out[name] = FLASH_ATTN[v] if f.name == "flash_attn" else bool(v) if f.name == "cpu_strict" else v
    return out


def cluster_flags() -> dict[str, str]:
    """The stage options a cluster file's ``[options]`` may set, each with its ``nak serve`` flag:
    ``{"ctx": "--ctx", "idle_timeout": "--idle-timeout", ...}`` (key: the long flag with ``_``)."""
    return {f.metadata["flags"][0][2:].replace("-", "_"): f.metadata["flags"][0]
            for f in option_fields() if f.metadata["cluster"]}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """Add every :class:`ServeOptions` field to ``ap`` as ``nak serve`` has it (same flags and
    defaults; an ``envvar`` is the default when set). :func:`from_namespace` reads them back."""
    for f in option_fields():
        m = f.metadata
        if not m["flags"] and not m["negative"]:
            ap.add_argument(f.name, help=m["help"])
            continue
        if f.name == "announce":
            ap.add_argument(m["flags"][0], dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                            help=m["help"])
        elif m["negative"]:
            ap.add_argument(m["negative"], dest=f.name, action="store_false", help=m["help"])
        elif f.type in ("bool", bool):
            ap.add_argument(*m["flags"], dest=f.name, action="store_true", help=m["help"])
        elif f.name == "fetch":
            ap.add_argument(*m["flags"], dest=f.name, action="append", default=[], help=m["help"])
        else:
            default = f.default
            if m["envvar"] and os.environ.get(m["envvar"]):
                default = os.environ[m["envvar"]]
            kind = int if f.type in ("int", int) else str
            ap.add_argument(*m["flags"], dest=f.name, type=kind, default=default, help=m["help"])


def from_namespace(a: argparse.Namespace) -> ServeOptions:
    """The :class:`ServeOptions` of arguments parsed with :func:`add_arguments`."""
    kw = {f.name: getattr(a, f.name) for f in option_fields()}
    kw["fetch"] = tuple(kw["fetch"] or ())
    return ServeOptions(**kw)
