"""The memory a stage needs, as users see it: its **footprint**, the smallest memory limit (a
cgroup's ``memory.limit_in_bytes``) under which it completes a full-context generation at speed
(``python -m nakshatra.bench.footprint`` measures it; docs/performance.md has the table).

:func:`predict_stage` predicts it from what llama.cpp itself says it will allocate for the stage
(:func:`llama_estimate`: the slice loaded with ``no_alloc``, a context created with exactly the
stage's parameters, ``llama_get_memory_breakdown``; cpp/stage/memory_estimate.h) plus what
llama.cpp does not allocate. The terms, in bytes:

``copied_weights``
    weights llama.cpp copies into its own buffers: the CPU's repacked layouts (``CPU_REPACK``:
    Q4_0, Q4_K, IQ4_NL... on x86-64), or every weight without mmap. Anonymous memory, always
    resident. Their originals in the mmap'd file are read once at load and are reclaimable.
``mapped_weights``
    weights used in place from the mmap'd slice (the CPU's default buffer type): file pages that
    must stay resident, or every token reads them from disk again. The input token embedding of
    the first stage is the exception: a lookup touches one row per token, so only the pages of
    the rows a context can hold count (``embd_rows_bytes``: ``min(n_vocab, n_ctx)`` rows, each at
    least a page, at most the whole tensor).
``kv``
    llama.cpp's context memory (KV cache, ``ctx x max_sessions`` positions of each layer; with
    ``swa_full`` a sliding-window layer keeps them all). Zeroed at start, so resident.
``compute``
    the scheduler's compute buffers at their reserved size: the worst-case prompt ubatch
    (``n_ubatch`` rows; the last stage reserves one output row per session, as it samples).
``output``
    llama.cpp's output buffer (not in its breakdown): a row of logits (last stage) or of hidden
    states (every other stage) per output row, for the most rows a decode asks for.
``llama_heap``
    the heap llama.cpp keeps beside its buffers: the vocabulary (token strings, lookup maps, BPE
    merges: tens of MiB for a 50k-262k token vocabulary, on every stage, since every slice
    carries it), tensor and graph metadata, the scheduler's tables. Measured while estimating:
    the process's heap in use (glibc ``mallinfo2``, macOS malloc zones) after the ``no_alloc``
    load and context minus before (``heap_bytes`` of the estimate; 0 where unknown).
``io``
    the stage's own copies of a batch of hidden states: the frame received, the rows decoded
    into the llama_batch, and on a stage that sends them on, the rows copied out and the frame
    sent (``n_embd x rows x 4`` bytes each, rows = ``min(n_batch, n_ctx)``; the first stage
    receives tokens, the last sends one token).
``baseline``
    the process itself: a ``nak serve`` stage is a Python process that imports the extension
    (interpreter, modules, llama.cpp's code, thread stacks, allocator slack). Measured, see
    :data:`PROCESS_BASELINE_BYTES`.

``total`` is their sum: host memory only (a GPU's buffers are listed apart, in ``device``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import NakError

MIB = 1 << 20


def _page_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4096

PROCESS_BASELINE_BYTES = 37_936_352
"""What a ``nak serve`` stage costs beyond llama.cpp's allocations and its own hidden-state copies,
bytes (36.2 MiB): the Python interpreter and the modules ``nak serve`` imports, the stage's
threads, allocator slack, llama.cpp's CPU work buffer. Measured, not estimated: ``python -m
nakshatra.bench.footprint --baseline`` (root) bisects, to 1 MiB, the footprint of a stage serving a
one-layer, n_embd 64 model (:func:`nakshatra.bench.footprint.baseline_model`) and subtracts its
predicted llama.cpp terms (68.0 MiB - 31.8 MiB on the 2-core x86-64 Linux VM, Python 3.11)."""


def llama_estimate(path: str | os.PathLike[str], ctx: int = 4096, max_sessions: int = 8, *,
                   n_batch: int = 2048, n_ubatch: int = 512, n_gpu_layers: int = -1, flash_attn: str = "auto",
                   cache_type_k: str = "f16", cache_type_v: str = "f16", no_repack: bool = False,
                   mlock: bool = False, swa_full: bool = False) -> dict[str, Any]:
    """What llama.cpp says it will allocate for a stage serving ``path`` (a slice or a whole model)
    as ``nak serve PATH --ctx CTX --max-sessions N ...`` would, without allocating it: the dict of
    ``_nakshatra.estimate_memory`` (bytes): ``buffers`` (per llama.cpp buffer type: ``name``,
    ``host``, ``mapped``, ``model``, ``context``, ``compute``), ``output_bytes``,
    ``output_rows_max``, ``heap_bytes`` and ``heap_known`` (see memory_estimate.h), and the stage's ``layer_start`` / ``layer_end`` / ``n_layer_full``,
    ``is_first`` / ``is_last``, ``n_ctx``, ``n_seq_max``, ``n_batch``, ``n_ubatch``, ``n_embd``,
    ``n_embd_out``, ``n_vocab``.

    Raises NakError for a missing file, a file that is not a GGUF, bad parameters (ctx or
    max_sessions < 1, an unknown cache type or flash-attn mode), or a model llama.cpp cannot load.
    """
    fa = {"auto": -1, "off": 0, "on": 1}.get(flash_attn)
    if fa is None:
        raise NakError(f"--flash-attn {flash_attn!r}: use auto, on or off")
    if ctx < 1 or max_sessions < 1:
        raise NakError(f"--ctx {ctx} and --max-sessions {max_sessions} must both be >= 1")
    if not Path(path).is_file():
        raise NakError(f"{path}: no such file; give a slice from `nak slice` or a whole GGUF")
    kw = dict(n_ctx=ctx, max_sessions=max_sessions, n_batch=n_batch, n_ubatch=n_ubatch, n_gpu_layers=n_gpu_layers,
              flash_attn=fa, cache_type_k=cache_type_k, cache_type_v=cache_type_v, no_repack=no_repack, mlock=mlock,
              swa_full=swa_full)
    # always in a fresh process: the heap figure is the process's growth during the estimate, so
    # in a process that does anything else at the same time (threads of a server, a test) it
    # would count their allocations too, and llama.cpp initialises some tables once per process
    # (about 2 MiB) that a stage pays for but a second estimate in one process would not see
    return _estimate_in_subprocess(path, kw)


def _estimate_in_subprocess(path: str | os.PathLike[str], kw: dict[str, Any]) -> dict[str, Any]:
    import json
    import subprocess
    import sys

    code = ("import json, sys; from nakshatra import _nakshatra; from nakshatra.errors import StageError\n"
            "a = json.loads(sys.argv[1])\n"
            "try: print(json.dumps(_nakshatra.estimate_memory(a.pop('path'), **a)))\n"
            "except StageError as e: print(json.dumps({'error': str(e)}))\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps({"path": str(path), **kw})],
                       capture_output=True, text=True, timeout=600)
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise NakError(f"cannot estimate the memory of {path}: the estimating process failed "
                       f"(exit {r.returncode}): {r.stderr.strip()[-500:]}") from None
    if "error" in out:
        raise NakError(f"cannot estimate the memory of {path}: {out['error']}")
    return out


def _input_embedding(path: str | os.PathLike[str], is_last: bool) -> tuple[int, int]:
    """(bytes, rows) of the token embedding in ``path`` when a stage uses it only as the input
    lookup table; (0, 0) when there is none, or when it is also the LM head (a tied model's last
    stage, or whole model, reads every row every token)."""
    from .shards import open_model

    reader = open_model(path).scan
    names = {t.name for t in reader.tensors}
    if is_last and "output.weight" not in names:
        return 0, 0
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            rows = int(t.shape[1]) if len(t.shape) > 1 else 1
            return int(t.n_bytes), rows
    return 0, 0


def predict_stage(path: str | os.PathLike[str], ctx: int = 4096, max_sessions: int = 8,
                  **stage_options: Any) -> dict[str, Any]:
    """The predicted footprint of a stage serving ``path`` with ``ctx`` positions per session and
    ``max_sessions`` sessions (``stage_options``: as :func:`llama_estimate`), in bytes, per the
    module docstring: ``copied_weights_bytes``, ``mapped_weights_bytes``, ``kv_bytes``,
    ``compute_bytes``, ``output_bytes``, ``llama_heap_bytes``, ``io_bytes``, ``baseline_bytes`` and their sum
    ``total_bytes``; also ``embd_rows_bytes`` (the part of mapped_weights that is the first
    stage's touched embedding rows), ``device_bytes`` (buffers off the host, not in the total)
    and ``estimate`` (:func:`llama_estimate`'s dict). ``path`` may be any shard of a split model:
    llama.cpp loads it from shard 1.

    Raises NakError as :func:`llama_estimate`, SliceError for a missing or foreign shard.
    """
    from .shards import open_model

    if Path(path).is_file():
        path = open_model(path).path
    e = llama_estimate(path, ctx, max_sessions, **stage_options)
    host = [b for b in e["buffers"] if b["host"]]
    mapped = sum(b["model"] for b in host if b["mapped"])
    copied = sum(b["model"] for b in host if not b["mapped"])
    embd_rows = 0
    if e["is_first"] and mapped:
        embd_bytes, n_vocab = _input_embedding(path, e["is_last"])
        if 0 < embd_bytes <= mapped:  # the lookup table is in the mapped buffer (get_rows: never repacked)
            row = max(embd_bytes // max(n_vocab, 1), _page_bytes())
            embd_rows = min(embd_bytes, min(n_vocab, e["n_ctx"]) * row)
            mapped -= embd_bytes - embd_rows
    rows = max(e["n_seq_max"], min(e["n_batch"], e["n_ctx"]))
    copies = (0 if e["is_first"] else 2) + (0 if e["is_last"] else 2)
    d: dict[str, Any] = {
        "copied_weights_bytes": copied,
        "mapped_weights_bytes": mapped,
        "kv_bytes": sum(b["context"] for b in host),
        "compute_bytes": sum(b["compute"] for b in host),
        "output_bytes": int(e["output_bytes"]),
        "llama_heap_bytes": int(e["heap_bytes"]),
        "io_bytes": copies * rows * e["n_embd"] * 4,
        "baseline_bytes": PROCESS_BASELINE_BYTES,
    }
    d["total_bytes"] = sum(d.values())
    d["embd_rows_bytes"] = embd_rows
    d["device_bytes"] = sum(b["model"] + b["context"] + b["compute"] for b in e["buffers"] if not b["host"])
    d["estimate"] = e
    return d
