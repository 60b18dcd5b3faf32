"""What a GGUF (whole model or slice) holds and how much memory a stage serving it needs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.table import Table

from ..ranges import LayerRange
from .archs import split_support
from .shards import open_model
from .slicer import kv_value, swa_pattern, tensor_role

ROLES = ("input", "layers", "output", "global")
KV_BYTES_PER_VALUE = 2  # f16 cache
KV_PAD = 256  # llama.cpp pads each session's KV size, and the sliding-window one, to 256 cells
DEFAULT_N_UBATCH = 512


def _pad(n: int) -> int:
    return -(-n // KV_PAD) * KV_PAD


def kv_cells(n_ctx: int, n_swa: int, sliding: bool, n_ubatch: int = DEFAULT_N_UBATCH, swa_full: bool = False) -> int:
    """KV cells one session holds in a layer, as llama.cpp sizes them: ``n_ctx`` padded to 256
    (llama-context.cpp, n_ctx_seq); a sliding-window layer without ``swa_full`` keeps
    ``pad256(min(that, n_swa + n_ubatch))`` (llama-kv-cache-iswa.cpp, size_swa): the window plus
    one ubatch, whatever the context."""
    full = _pad(n_ctx)
    return _pad(min(full, n_swa + n_ubatch)) if sliding and n_swa > 0 and not swa_full else full


def _per_layer(value: Any, n: int, default: int) -> list[int]:
    if value is None:
        return [default] * n
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(value)] * n


def inspect_gguf(path: str | os.PathLike[str], n_ctx: int = 4096, max_sessions: int = 1,
                 n_ubatch: int = DEFAULT_N_UBATCH, swa_full: bool = False, *, predict: bool = False) -> dict[str, Any]:
    """Describe a GGUF file, or a model split into shards given any of them (all its shards are
    read, see :func:`nakshatra.gguf.shards.open_model`). Sizes are bytes.

    Returns a dict with ``path``, ``shards`` (the files of a split model, else None), ``arch``,
    ``kind`` (``"model"`` or ``"slice"``), ``range`` (the global
    :class:`~nakshatra.ranges.LayerRange` of a slice, else None), ``slice_index``,
    ``slice_count``, ``n_layer`` (layers in this file), ``n_layer_full``, ``n_embd``, ``n_head``
    and ``n_head_kv`` (ints, or per-layer lists when the model varies them), ``head_dim_k``,
    ``head_dim_v``, ``tensors`` (role -> ``{"count", "bytes"}`` for roles input / layers / output /
    global; a tied ``token_embd`` on a later slice counts as output), ``weights_bytes``, ``n_ctx``,
    ``max_sessions``, ``split`` (for a whole model: ``{"ok", "reason"}``, whether it can be cut by
    layer ranges, see :func:`nakshatra.gguf.archs.split_support`; None for a slice), ``n_swa`` (the
    sliding window, tokens; 0: none), ``kv_layer_bytes`` (per
    layer), ``kv_bytes`` and ``total_bytes`` (weights + KV; compute buffers are not included, see
    ``note``). With ``predict``, also ``footprint``: :func:`nakshatra.gguf.memory.predict_stage` for a
    stage serving the file with ``--ctx n_ctx --max-sessions max_sessions`` (and ``--swa-full``
    when ``swa_full``): its terms in bytes, ``total_bytes`` the predicted footprint; loads the
    file's metadata into llama.cpp, so it takes a second or so.

    The KV estimate of a layer is ``max_sessions * cells * (n_embd_k_gqa + n_embd_v_gqa) * 2``
    (f16) with ``n_embd_k_gqa = head_dim_k * n_head_kv[layer]`` (``head_dim_k`` is
    ``<arch>.attention.key_length`` if present, else ``n_embd / n_head``) and ``cells`` per
    :func:`kv_cells`: ``n_ctx`` (tokens per session) for a full-attention layer, the window plus
    one ``n_ubatch`` for a sliding-window layer, as a stage allocates it (the whole context with
    ``swa_full``, ``nak serve --swa-full``).

    Raises SliceError if the file is missing or not a GGUF, or a shard is missing or foreign; with
    ``predict``, NakError as
    :func:`nakshatra.gguf.memory.predict_stage` (e.g. ``max_sessions`` < 1).
    """
    model = open_model(path)
    reader = model.scan  # metadata without materialising the vocabulary
    arch = kv_value(reader, "general.architecture") or "?"
    n_layer = int(kv_value(reader, f"{arch}.block_count") or 0)
    n_embd = int(kv_value(reader, f"{arch}.embedding_length") or 0)
    heads = _per_layer(kv_value(reader, f"{arch}.attention.head_count"), n_layer, 0)
    heads_kv_raw = kv_value(reader, f"{arch}.attention.head_count_kv")
    heads_kv = _per_layer(heads_kv_raw, n_layer, 0) if heads_kv_raw is not None else list(heads)
    key_len, value_len = (kv_value(reader, f"{arch}.attention.{k}_length") for k in ("key", "value"))
    first_heads = next((h for h in heads if h), 0)
    head_k = int(key_len) if key_len else (n_embd // first_heads if first_heads else 0)
    head_v = int(value_len) if value_len else head_k

    start = kv_value(reader, "nakshatra.layer_range_start")
    end = kv_value(reader, "nakshatra.layer_range_end")
    is_slice = start is not None and end is not None
    tensors = {role: {"count": 0, "bytes": 0} for role in ROLES}
    for t in reader.tensors:
        role = tensor_role(t.name)
        if role == "layer":
            role = "layers"
        elif t.name == "token_embd.weight" and is_slice and start > 0:
            role = "output"  # a tied embedding on a later stage only serves as the LM head
        tensors[role]["count"] += 1
        tensors[role]["bytes"] += int(t.n_bytes)
    weights = sum(r["bytes"] for r in tensors.values())
    n_swa = int(kv_value(reader, f"{arch}.attention.sliding_window") or 0)
    sliding = swa_pattern(reader, arch, n_layer) or [False] * n_layer
    kv_layers = [max_sessions * kv_cells(n_ctx, n_swa, sliding[il], n_ubatch, swa_full) * (head_k + head_v) * h
                 * KV_BYTES_PER_VALUE for il, h in enumerate(heads_kv)]
    kv = sum(kv_layers)

    def scalar_or_list(values: list[int]) -> int | list[int]:
        return values[0] if values and len(set(values)) == 1 else values

    info = {
        "path": str(Path(path)), "shards": [str(p) for p in model.paths] if model.sharded else None,
        "arch": arch, "kind": "slice" if is_slice else "model",
        "range": LayerRange(start, end) if is_slice else None,
        "slice_index": kv_value(reader, "nakshatra.slice_index"),
        "slice_count": kv_value(reader, "nakshatra.slice_count"),
        "n_layer": n_layer, "n_layer_full": kv_value(reader, "nakshatra.n_layer_full") or n_layer,
        "n_embd": n_embd, "n_head": scalar_or_list(heads), "n_head_kv": scalar_or_list(heads_kv),
        "head_dim_k": head_k, "head_dim_v": head_v,
        "tensors": tensors, "weights_bytes": weights,
        "n_ctx": n_ctx, "max_sessions": max_sessions, "n_swa": n_swa, "swa_full": swa_full,
        "kv_layer_bytes": kv_layers, "kv_bytes": kv, "total_bytes": weights + kv,
        "note": "total = weights + f16 KV cache; compute buffers are not included",
        "split": None,
    }
    if not is_slice:
        s = split_support(str(arch))
        info["split"] = {"ok": s.ok, "reason": s.reason}
    if predict:
        from .memory import predict_stage

        fp = predict_stage(model.path, ctx=n_ctx, max_sessions=max_sessions, n_ubatch=n_ubatch, swa_full=swa_full)
        fp.pop("estimate")
        info["max_sessions"] = max_sessions
        info["footprint"] = fp
        info["note"] = ("total = weights + f16 KV cache; footprint = what a stage needs resident "
                        "(predicted: llama.cpp's own allocations + the process, see nakshatra.gguf.memory)")
    return info


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def render_inspection(info: dict[str, Any]) -> Table:
    """A two-column rich table of :func:`inspect_gguf`'s result, for ``nak inspect``."""
    table = Table(title=info["path"], show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    if info["kind"] == "slice":
        count = info["slice_count"]
        which = f"slice {info['slice_index'] + 1} of {count}" if count else "slice"
        table.add_row("kind", f"{which}: layers {info['range']} of {info['n_layer_full']}")
    elif info.get("shards"):
        table.add_row("kind", f"whole model in {len(info['shards'])} shards")
    else:
        table.add_row("kind", "whole model")
    table.add_row("architecture", info["arch"])
    split = info.get("split")
    if split:
        table.add_row("can be split", "yes, by layer ranges" if split["ok"] else f"[bold]no[/bold]: {split['reason']}")
    table.add_row("layers in file", str(info["n_layer"]))
    table.add_row("n_embd", str(info["n_embd"]))
    table.add_row("heads / kv heads", f"{info['n_head']} / {info['n_head_kv']}")
    for role in ROLES:
        t = info["tensors"][role]
        table.add_row(f"{role.rstrip('s')} tensors", f"{t['count']} ({_mib(t['bytes'])})")
    table.add_row("weights", _mib(info["weights_bytes"]))
    sessions = info.get("max_sessions", 1)
    positions = f"{info['n_ctx']} tokens" + (f" x {sessions} sessions" if sessions > 1 else "")
    window = ""
    if info.get("n_swa"):
        window = ("; sliding-window layers: the whole context (--swa-full)" if info.get("swa_full")
                  else f"; sliding-window layers: {info['n_swa']}-token window + one ubatch")
    table.add_row(f"KV cache ({positions}, f16{window})", _mib(info["kv_bytes"]))
    table.add_row("weights + KV", _mib(info["total_bytes"]))
    fp = info.get("footprint")
    if fp:
        for key, what in (("copied_weights_bytes", "weights copied (repacked)"),
                          ("mapped_weights_bytes", "weights used from the file"),
                          ("kv_bytes", "KV cache (llama.cpp)"), ("compute_bytes", "compute buffers"),
                          ("output_bytes", "output buffer"), ("llama_heap_bytes", "llama.cpp heap (vocabulary, graph)"),
                          ("io_bytes", "hidden-state copies"), ("baseline_bytes", "process baseline")):
            table.add_row(f"  {what}", _mib(fp[key]))
        table.add_row("footprint (predicted)", f"[bold]{_mib(fp['total_bytes'])}[/bold] resident for "
                      f"`nak serve --ctx {info['n_ctx']} --max-sessions {sessions}`")
    return table
