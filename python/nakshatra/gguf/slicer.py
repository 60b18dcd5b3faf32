"""Cut a GGUF model into layer-range slices that the patched llama.cpp loads as partial models.

A slice holds the blocks of its range renamed to ``blk.0..``, the global tensors, the input tensors
on the first stage and the output tensors on the last (plus ``token_embd`` there when the embedding
is tied), all metadata of the original with the per-layer values cut to the range, and the
``nakshatra.*`` keys (see :data:`NAK_KEYS`).

Memory does not grow with the model: the original is read with the scanner of
:mod:`nakshatra.gguf.scan` (``gguf.GGUFReader`` would turn every vocabulary entry into numpy
objects, more than the whole file on a small model), and each slice is written as the original's
metadata copied pair by pair (re-encoded only where a value changes), then the tensor infos, then
the tensor data copied byte for byte, all streamed one 1 MiB chunk at a time. The bytes are the
ones ``gguf.GGUFWriter`` writes for the same metadata and tensors.

A model may be one file or any shard of a split model (:mod:`nakshatra.gguf.shards`): the shards are
read as the one model they are, and the slices are the bytes slices of the unsplit file would be.

Sliding-window models: a period restarts at a slice's local layer 0 in llama.cpp, so a slice gets
an explicit per-layer BOOL ``<arch>.attention.sliding_window_pattern`` computed from the global
layout (:func:`swa_pattern`); a slice with no sliding layer at all gets
``<arch>.attention.sliding_window = 0`` (llama.cpp cannot build a sliding-window cache without one,
and full attention is what those layers do anyway). Checked bit-exact against the unsplit model on
gemma3-270m with a 1201-token prompt, where a slice without the explicit pattern is wrong.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType

from ..errors import RangeError, SliceError
from ..paths import cache_dir
from ..ranges import LayerRange, check_cover, plan_parts
from .archs import require_splittable
from .manifest import CHUNK, Manifest, SliceInfo, sha256_file, write_atomic
from .scan import GGUFScan, KVInfo, encode_kv, scan as _scan
from .shards import GGUFModel, ModelFiles, model_bytes, model_sha256, open_model, shard_stats, write_gguf

"""Architectures whose slices are known to load and run on the patched llama.cpp."""

INPUT_PREFIXES = ("token_embd.", "token_types.", "pos_embd.")
"""Tensors llama.cpp treats as input layer (``LLM_TENSOR_LAYER_INPUT``): first stage only."""

OUTPUT_PREFIXES = ("output_norm.", "output.")
"""Tensors llama.cpp treats as output layer (``LLM_TENSOR_LAYER_OUTPUT``): last stage only."""

def swa_default(arch: str) -> tuple[int, bool] | None:
    """The sliding-window period llama.cpp assumes for ``arch`` when a file declares no pattern,
    and whether the full-attention layer comes first in each period: ``(6, False)`` for gemma3
    (``load_swa_pattern(ml, 6)`` in src/models/gemma3.cpp, read by cpp/cmake/arch_table.py);
    None when its loader reads no pattern (phi3: every layer slides, a slice needs nothing)."""
    from .archs import arch_table

    p = arch_table().get(arch, {}).get("swa_pattern")
    return (p["period"], p["dense_first"]) if p else None

NAK_KEYS = ("nakshatra.layer_range_start", "nakshatra.layer_range_end", "nakshatra.n_layer_full",
            "nakshatra.slice_index", "nakshatra.slice_count", "nakshatra.model_sha256",
            "nakshatra.tensor_data_sha256")
"""Keys every slice carries. ``layer_range_end`` is exclusive; the sha256 values are hex strings.
A slice cut alone by :func:`cached_slice` has ``slice_index`` 0 and ``slice_count`` 0."""

_A = GGUFValueType

Reader = GGUFReader | GGUFScan
"""A parsed GGUF: ``gguf.GGUFReader`` or the lighter
:class:`~nakshatra.gguf.scan.GGUFScan` (:func:`scan_gguf`)."""


def scan_gguf(path: str | os.PathLike[str]) -> GGUFScan:
    """Scan a GGUF file's metadata and tensor infos without materialising array values (see
    :mod:`nakshatra.gguf.scan`); values are read on demand with :func:`kv_value`.

    Raises SliceError naming the file if it is missing, unreadable, or not a valid GGUF.
    """
    return _opened(path, _scan)


def _opened(path: str | os.PathLike[str], opener: Callable[[Path], Any]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise SliceError(f"{p}: no such model file; give the path of a .gguf file")
    try:
        return opener(p)
    except PermissionError as e:
        raise SliceError(f"cannot read {p}: permission denied") from e
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
        raise SliceError(f"{p} is not a GGUF file (or it is truncated): {e}; "
                         "give a complete .gguf model file") from e


def tensor_role(name: str) -> str:
    """Where a tensor goes: ``"layer"`` (``blk.N.*``), ``"input"`` (first stage), ``"output"``
    (last stage) or ``"global"`` (every stage, e.g. ``rope_freqs.weight``)."""
    if name.startswith("blk."):
        return "layer"
    if name.startswith(INPUT_PREFIXES):
        return "input"
    if name.startswith(OUTPUT_PREFIXES):
        return "output"
    return "global"


def _layer_index(name: str) -> int:
    return int(name.split(".", 2)[1])


def kv_value(reader: Reader, key: str) -> Any:
    """The value of metadata ``key`` (int, float, bool, str or list), or None if absent."""
    if isinstance(reader, GGUFScan):
        return reader.value(key)
    f = reader.fields.get(key)
    return None if f is None else f.contents()


@dataclass(frozen=True)
class ModelLayout:
    """What slicing needs to know about a model. Sizes are bytes of tensor data.

    ``layer_bytes[i]``: tensors of ``blk.i``; ``input_bytes``: input tensors (``token_embd`` and
    the like); ``output_bytes``: ``output_norm`` and ``output``; ``token_embd_bytes``: the token
    embedding alone; ``tied``: there is no ``output.weight`` (the LM head reuses ``token_embd``);
    ``global_tensors``: names of tensors every stage keeps; ``n_layer``: the decoder layers, not
    counting ``n_nextn`` multi-token-prediction (next-n) blocks stored after them, which no slice
    carries (llama.cpp skips them unless asked to draft with them); ``sha256``: hex of the whole file
    (of a split model: its identity, :func:`nakshatra.gguf.shards.model_sha256`); ``file_bytes``: its
    size (a split model's: :func:`nakshatra.gguf.shards.model_bytes`). ``path``: the file, or shard 1.
    """

    path: Path
    arch: str
    n_layer: int
    n_embd: int
    layer_bytes: list[int]
    input_bytes: int
    output_bytes: int
    token_embd_bytes: int
    tied: bool
    global_tensors: list[str]
    global_bytes: int
    sha256: str
    file_bytes: int
    n_nextn: int = 0

    @property
    def first_extra(self) -> int:
        """Bytes the first stage holds beyond its layers: the input tensors. (Global tensors are on
        every stage alike, so they do not change which split is best.)"""
        return self.input_bytes

    @property
    def last_extra(self) -> int:
        """Bytes the last stage holds beyond its layers: the output tensors, plus the token
        embedding when tied."""
        return self.output_bytes + (self.token_embd_bytes if self.tied else 0)


def _layout(reader: Reader, path: Path, sha256: str, file_bytes: int) -> ModelLayout:
    arch = kv_value(reader, "general.architecture")
    require_splittable(str(arch), path)
    if any(k in reader.fields for k in NAK_KEYS):
        raise SliceError(f"{path} is already a slice; slice the whole model instead")
    n_block, n_embd = kv_value(reader, f"{arch}.block_count"), kv_value(reader, f"{arch}.embedding_length")
    if not isinstance(n_block, int) or n_block < 1 or not isinstance(n_embd, int):
        raise SliceError(f"{path}: missing or invalid {arch}.block_count / {arch}.embedding_length")
    n_nextn = kv_value(reader, f"{arch}.nextn_predict_layers") or 0
    if not isinstance(n_nextn, int) or not 0 <= n_nextn < n_block:
        raise SliceError(f"{path}: invalid {arch}.nextn_predict_layers={n_nextn} for {n_block} blocks")
    n_layer = n_block - n_nextn
    layer_bytes = [0] * n_layer
    sums = {"input": 0, "output": 0, "global": 0}
    names, token_embd = [], 0
    for t in reader.tensors:
        role, n = tensor_role(t.name), int(t.n_bytes)
        if role == "layer":
            il = _layer_index(t.name)
            if il >= n_block:
                raise SliceError(f"{path}: tensor {t.name} is beyond {arch}.block_count={n_block}; "
                                 "this model layout is not supported")
            if il < n_layer:  # next-n blocks are in no slice
                layer_bytes[il] += n
        else:
            sums[role] += n
            names.append(t.name)
        if t.name == "token_embd.weight":
            token_embd = n
    return ModelLayout(path=path, arch=arch, n_layer=n_layer, n_embd=n_embd, layer_bytes=layer_bytes,
                       input_bytes=sums["input"], output_bytes=sums["output"],
                       token_embd_bytes=token_embd, tied="output.weight" not in names,
                       global_tensors=[n for n in names if tensor_role(n) == "global"],
                       global_bytes=sums["global"], sha256=sha256, file_bytes=file_bytes, n_nextn=n_nextn)


def _model_layout(model: GGUFModel, sha256: str) -> ModelLayout:
    return _layout(model.scan, model.path, sha256, model_bytes(model))


def model_layout(path: str | os.PathLike[str], *, sha256: str | None = None,
                 progress: bool = False) -> ModelLayout:
    """Read a model's layout (metadata and tensor sizes) and hash it (streamed, 1 MiB chunks; a
    byte progress bar on stderr when ``progress`` and the model is split) unless a trusted
    ``sha256`` is given. ``path`` is a GGUF file or any shard of a split model. Raises SliceError
    if a file is missing, not a GGUF, already a slice, of an unsupported architecture (the message
    lists supported ones), or a shard is missing or foreign (:func:`nakshatra.gguf.shards.open_model`)."""
    model = open_model(path)
    return _model_layout(model, sha256 or model_sha256(model, progress))


# --- metadata -------------------------------------------------------------------------------

def _check_copyable(scan: GGUFScan) -> None:
    for key, kv in scan.fields.items():
        if not key.startswith("GGUF.") and not kv.copyable:
            raise SliceError(f"metadata key {key} is an empty or nested array, which cannot be copied")


def swa_pattern(reader: Reader, arch: str, n_layer: int) -> list[bool] | None:
    """The global per-layer sliding-window flags (True = sliding window) as llama.cpp derives them,
    or None if the model has no sliding window or its architecture reads no pattern.

    An array ``<arch>.attention.sliding_window_pattern`` is used as is; a scalar period P (or the
    architecture's default, :func:`swa_default`) makes layer il sliding iff ``(il + 1) % P != 0``,
    or with the full layer first iff ``il % P != 0`` (P = 0: every layer), as
    ``llama_hparams::set_swa_pattern``.
    """
    window = kv_value(reader, f"{arch}.attention.sliding_window")
    if not window:
        return None
    pattern = kv_value(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise SliceError(f"{arch}.attention.sliding_window_pattern has {len(pattern)} entries "
                             f"for {n_layer} layers")
        return [bool(x) for x in pattern]
    default = swa_default(arch)
    if default is None:
        return None
    period, dense_first = default
    if pattern is not None:
        period = pattern
    if dense_first:
        return [period == 0 or il % period != 0 for il in range(n_layer)]
    return [period == 0 or (il + 1) % period != 0 for il in range(n_layer)]


def _check_sliding_layers(layout: ModelLayout, swa: list[bool] | None, ranges: list[LayerRange]) -> None:
    """Raise SliceError when a range holds no sliding-window layer of a model whose llama.cpp graph
    builds only a sliding-window cache (gemma2, gpt-oss, cohere2, ...: ``swa_required`` in the
    architecture table), which asserts that one exists; checked before anything is written."""
    from .archs import arch_table

    if swa is None or not arch_table().get(layout.arch, {}).get("swa_required"):
        return
    for r in ranges:
        if not any(swa[r.start:r.end]):
            raise SliceError(f"layers {r.inclusive()} of this {layout.arch} model are all full-attention layers, and "
                             f"llama.cpp's {layout.arch} graph needs a sliding-window layer in every slice; "
                             "move the cut so this range includes a sliding-window layer")


def _slice_metadata(scan: GGUFScan, fd: int, layout: ModelLayout, swa: list[bool] | None,
                    rng: LayerRange, index: int, count: int, data_sha: str) -> dict[str, Any]:
    """The metadata a slice changes or adds, key -> (value, type, element type), in the order
    GGUFWriter would place them: a key of the original keeps its place, new keys follow it."""
    arch, n, fields = layout.arch, layout.n_layer, scan.fields
    out: dict[str, Any] = {}
    for key, kv in fields.items():  # per-layer arrays (one entry per block): cut to the range
        if kv.type == _A.ARRAY and key.startswith(arch + ".") and kv.count in (n, n + layout.n_nextn):
            out[key] = (scan.array_items(fd, key)[rng.start:rng.end], _A.ARRAY, kv.sub_type)
    block = f"{arch}.block_count"
    out[block] = (rng.n_layers, fields[block].type, None)
    nextn = f"{arch}.nextn_predict_layers"
    if nextn in fields:  # the next-n blocks stay out of every slice
        out[nextn] = (0, fields[nextn].type, None)
    lead = f"{arch}.leading_dense_block_count"
    if lead in fields:
        # loaders and builders test `il < n_layer_dense_lead` with the slice's local il
        out[lead] = (max(0, kv_value(scan, lead) - rng.start), fields[lead].type, None)
    if swa is not None:
        flags = swa[rng.start:rng.end]
        out[f"{arch}.attention.sliding_window_pattern"] = (flags, _A.ARRAY, _A.BOOL)
        if not any(flags):
            # only full-attention layers: llama.cpp asserts (is_swa_any) when building a
            # sliding-window cache without a sliding layer, so declare no window at all
            window = f"{arch}.attention.sliding_window"
            out[window] = (0, fields[window].type, None)
    u32 = {"layer_range_start": rng.start, "layer_range_end": rng.end, "n_layer_full": n,
           "slice_index": index, "slice_count": count}
    for k, v in u32.items():
        out["nakshatra." + k] = (v, _A.UINT32, None)
    out["nakshatra.model_sha256"] = (layout.sha256, _A.STRING, None)
    out["nakshatra.tensor_data_sha256"] = (data_sha, _A.STRING, None)
    return out


def _slice_tensors(reader: Reader, layout: ModelLayout, rng: LayerRange) -> list[tuple[str, Any]]:
    first, last = rng.start == 0, rng.end == layout.n_layer
    out = []
    for t in reader.tensors:
        role = tensor_role(t.name)
        if role == "layer":
            il = _layer_index(t.name)
            if rng.start <= il < rng.end:
                out.append((f"blk.{il - rng.start}." + t.name.split(".", 2)[2], t))
        elif (role == "global" or (role == "input" and first) or (role == "output" and last)
              or (last and layout.tied and t.name == "token_embd.weight")):
            out.append((t.name, t))
    return out


# --- writing --------------------------------------------------------------------------------

def _stream(fd: int, offset: int, n: int, sinks: list[Callable[[bytes], Any]]) -> None:
    """Feed bytes ``[offset, offset+n)`` of file ``fd`` to every sink, 1 MiB at a time."""
    end = offset + n
    while offset < end:
        chunk = os.pread(fd, min(CHUNK, end - offset), offset)
        if not chunk:
            raise SliceError(f"unexpected end of the model file at byte {offset}; the file is truncated")
        for sink in sinks:
            sink(chunk)
        offset += len(chunk)


def tensor_data_sha256(tensors: list[Any], fd: int | ModelFiles, on_bytes: Any = None) -> str:
    """sha256 over the data bytes of ``tensors`` (tensor infos from :func:`scan_gguf`, or GGUFReader
    tensors, of the file open as ``fd``; or of a model's open files,
    :class:`~nakshatra.gguf.shards.ModelFiles`), in the order given, each tensor's ``n_bytes`` bytes
    from its ``data_offset``: alignment padding is not hashed. For a slice, the order is the file's
    tensor-info order, which is also the order of the data; this is
    ``nakshatra.tensor_data_sha256``. ``on_bytes(n)``, if given, is called after each tensor with
    its byte count (progress)."""
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(fd, ModelFiles):
            fd.stream(t, [h.update])
        else:
            _stream(fd, int(t.data_offset), int(t.n_bytes), [h.update])
        if on_bytes is not None:
            on_bytes(int(t.n_bytes))
    return h.hexdigest()


def _io_error(e: OSError, path: Path) -> SliceError:
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(path.parent).free
        return SliceError(f"disk full writing {path}: free {free} bytes; free some space or "
                          "choose another output directory")
    return SliceError(f"cannot write {path}: {e.strerror or e}; choose a writable output directory")


def _write_slice(model: GGUFModel, files: ModelFiles, layout: ModelLayout, swa: list[bool] | None,
                 rng: LayerRange, index: int, count: int, path: Path,
                 advance: Callable[[int], Any]) -> SliceInfo:
    """Write one slice to ``path`` via ``<path>.tmp``; the temp file never survives an error.

    The layout is GGUFWriter's (:func:`nakshatra.gguf.shards.write_gguf`): header, every key of the
    original in its order (copied, or re-encoded where :func:`_slice_metadata` changes it), the
    added keys, tensor infos, then each tensor's data padded to the alignment."""
    scan = model.scan
    tensors = _slice_tensors(scan, layout, rng)
    data_sha = tensor_data_sha256([t for _, t in tensors], files)
    changes = _slice_metadata(scan, files.kv_fd, layout, swa, rng, index, count, data_sha)
    kvs: list[KVInfo | bytes] = [encode_kv(k, *changes[k]) if k in changes else kv
                                 for k, kv in scan.fields.items() if not k.startswith("GGUF.")]
    kvs += [encode_kv(k, *v) for k, v in changes.items() if k not in scan.fields]
    tmp = path.with_name(path.name + ".tmp")
    fout = None
    try:
        try:
            fout = open(tmp, "wb")  # noqa: SIM115 - closed below, also when a write fails
            write_gguf(fout.write, files, kvs, tensors, scan.alignment, advance)
            fout.flush()
            os.fsync(fout.fileno())
            fout.close()
        except OSError as e:
            raise _io_error(e, path) from e
        except ValueError as e:  # copy_kv: the model file changed or shrank under us
            raise SliceError(f"cannot copy the metadata of {layout.path}: {e}; is the file complete?") from e
        info = SliceInfo(file=path.name, layer_start=rng.start, layer_end=rng.end,
                         bytes=tmp.stat().st_size, sha256=sha256_file(tmp), tensor_data_sha256=data_sha)
        os.replace(tmp, path)
        return info
    except BaseException:
        if fout is not None:
            with suppress(OSError):  # the buffered bytes that failed to write fail again on close
                fout.close()
        tmp.unlink(missing_ok=True)
        raise


def _prepare_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SliceError(f"cannot create output directory {out_dir}: {e.strerror or e}; "
                         "choose a writable directory") from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise SliceError(f"output directory {out_dir} is not writable; choose a writable directory")


def byte_progress(enabled: bool) -> Any:
    """A Rich byte progress bar on stderr (description, bar, bytes, speed, time left), or a null
    context when ``enabled`` is false."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))


def _cut(model: GGUFModel, layout: ModelLayout, plan: list[tuple[LayerRange, int, int, Path]],
         progress: bool) -> list[SliceInfo]:
    """Write each (range, index, count, path) of ``plan``; returns their SliceInfo in order."""
    scan = model.scan
    _check_copyable(scan)
    swa = swa_pattern(scan, layout.arch, layout.n_layer)
    _check_sliding_layers(layout, swa, [r for r, *_ in plan])
    sizes = [sum(t.n_bytes for _, t in _slice_tensors(scan, layout, r)) for r, *_ in plan]
    out_dir = plan[0][3].parent
    free = shutil.disk_usage(out_dir).free
    if free < sum(sizes):
        raise SliceError(f"disk full writing {out_dir}: the slices need about {sum(sizes)} bytes, "
                         f"free {free} bytes; free some space or choose another output directory")
    infos = []
    with byte_progress(progress) as bar, model.open() as files:
        task = bar.add_task("slicing", total=sum(sizes)) if bar is not None else None
        for rng, index, count, path in plan:
            if bar is not None:
                bar.update(task, description=f"slicing {path.name}")
            advance = (lambda n: bar.advance(task, n)) if bar is not None else (lambda n: None)
            infos.append(_write_slice(model, files, layout, swa, rng, index, count, path, advance))
    return infos


def slice_model(model_path: str | os.PathLike[str], ranges: list[LayerRange] | None = None,
                n_parts: int | None = None, out_dir: str | os.PathLike[str] | None = None,
                progress: bool = True, *, sha256: str | None = None) -> Manifest:
    """Cut a model into slices and write ``<out_dir>/<stem>.<a>-<b>.gguf`` (inclusive layer
    numbers) for each range, plus ``<out_dir>/<stem>.manifest.json``.

    ``model_path`` is a GGUF file or any shard of a split model (``<stem>-00001-of-0000N.gguf``,
    ...): then every shard is read and checked before anything is written, ``stem`` is the
    shards' prefix, and the slices, manifest included, are the bytes the unsplit model gives
    (:mod:`nakshatra.gguf.shards`; a progress bar for hashing the shards too). ``sha256``: the
    model's identity (:func:`nakshatra.gguf.shards.model_sha256`, hex) when it is known, instead of
    hashing the model; then only the bytes :func:`slice_byte_ranges` lists are read, so a
    sparse copy of a remote model holding just those cuts the slices the whole model gives.

    Give exactly one of ``ranges`` (global, half-open, must cover every layer once) or ``n_parts``
    (planned by :func:`plan_parts` to balance bytes per stage). ``out_dir`` defaults to the current
    directory and is created if needed. Each file is written as ``<name>.tmp`` and renamed when
    complete; a failure leaves no temporary file (slices finished before it stay, the manifest is
    not written). ``progress`` shows a byte progress bar on stderr. Memory does not grow with the
    model or its vocabulary (nothing is held but the scanned key and tensor positions and 1 MiB
    chunks): peak RSS measured 38 MB slicing gemma3-270m (253 MB, 262k-token vocabulary) and
    SmolLM2-135M (98 MB) into three, of which 35.5 MB is Python with numpy and gguf imported.

    Raises RangeError for bad ranges or part counts, SliceError for a missing / non-GGUF /
    unsupported model, a missing or foreign shard, an output directory that cannot be created or
    written, or a full disk.
    """
    if (ranges is None) == (n_parts is None):
        raise RangeError("give exactly one of explicit layer ranges or a number of parts")
    out = Path.cwd() if out_dir is None else Path(out_dir)
    model = open_model(model_path)
    layout = _model_layout(model, "")
    if n_parts is not None:
        ranges = plan_parts(layout.layer_bytes, n_parts, layout.first_extra, layout.last_extra)
    ranges = check_cover(ranges or [], layout.n_layer)
    _prepare_out_dir(out)
    layout = replace(layout, sha256=sha256 or model_sha256(model, progress))
    stem = model.stem
    plan = [(r, i, len(ranges), out / f"{stem}.{r.inclusive()}.gguf") for i, r in enumerate(ranges)]
    infos = _cut(model, layout, plan, progress)
    manifest = Manifest(model={"name": stem, "arch": layout.arch, "n_embd": layout.n_embd,
                               "n_layer": layout.n_layer, "sha256": layout.sha256,
                               "bytes": layout.file_bytes}, slices=infos)
    target = out / f"{stem}.manifest.json"
    try:
        manifest.save(target)
    except OSError as e:
        raise _io_error(e, target) from e
    return manifest


def slice_byte_ranges(model_path: str | os.PathLike[str],
                      ranges: list[LayerRange]) -> dict[Path, list[tuple[int, int]]]:
    """The bytes of each model file that cutting ``ranges`` reads, file -> sorted, merged
    ``(offset, length)`` pairs: every file's header, metadata and tensor infos (``[0, data
    offset)``, what :func:`nakshatra.gguf.shards.open_model` reads) and the data of every tensor the
    slices hold. ``model_path``: a GGUF file or any shard (whose own metadata must be present).
    Raises SliceError as :func:`model_layout`, RangeError for ranges beyond the model."""
    model = open_model(model_path)
    layout = _model_layout(model, "")
    spans = {p: [(0, s.data_offset)] for p, s in zip(model.paths, model.files)}
    for rng in ranges:
        if rng.end > layout.n_layer:
            raise RangeError(f"layer range {rng.inclusive()} is beyond the model: it has "
                             f"{layout.n_layer} layers, numbered 0..{layout.n_layer - 1}")
        for _, t in _slice_tensors(model.scan, layout, rng):
            spans[model.paths[model.shard_of[t.name]]].append((t.data_offset, t.n_bytes))
    return {p: _merged(s) for p, s in spans.items()}


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, n in sorted(spans):
        if out and offset <= out[-1][0] + out[-1][1]:
            start, length = out[-1]
            out[-1] = (start, max(length, offset + n - start))
        elif n:
            out.append((offset, n))
    return out


# --- reading slices -------------------------------------------------------------------------

def _slice_keys(reader: Reader) -> dict[str, Any]:
    return {k: kv_value(reader, k) for k in NAK_KEYS}


def read_slice_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``nakshatra.*`` keys of a GGUF (see :data:`NAK_KEYS`), full key names to values; all
    None for a whole model. Raises SliceError if the file is missing or not a GGUF."""
    return _slice_keys(scan_gguf(path))


def _checked_meta(path: Path, progress: bool = False) -> dict[str, Any]:
    scanned = scan_gguf(path)
    meta = _slice_keys(scanned)
    want = meta["nakshatra.tensor_data_sha256"]
    if want is None:
        raise SliceError(f"{path} is not a Nakshatra slice (no nakshatra.tensor_data_sha256); "
                         "re-run nak slice")
    with byte_progress(progress) as bar, open(path, "rb") as f:
        task = bar.add_task(f"checking {path.name}", total=sum(int(t.n_bytes) for t in scanned.tensors)) if bar else None
        got = tensor_data_sha256(scanned.tensors, f.fileno(),
                                 (lambda n: bar.advance(task, n)) if bar else None)
    if got != want:
        raise SliceError(f"{path} is corrupt: its tensor data does not match its sha256; "
                         "re-run nak slice")
    return meta


def verify_slice(path: str | os.PathLike[str], progress: bool = False) -> bool:
    """Recompute a slice's tensor-data hash (see :func:`tensor_data_sha256`) and compare it with
    its ``nakshatra.tensor_data_sha256`` (a byte progress bar on stderr when ``progress``). Returns
    True; raises SliceError naming the file and "re-run nak slice" if it is not a slice,
    truncated, or its data changed."""
    _checked_meta(Path(path), progress)
    return True


# --- on-the-fly cut, cached -----------------------------------------------------------------

@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _known_sha256(model: GGUFModel, index_path: Path, progress: bool = False) -> str:
    """The identity of ``model`` (:func:`nakshatra.gguf.shards.model_sha256`), remembered in
    ``index_path``: a single file by (resolved path, size, mtime), a split model by (shard 1's
    absolute path, every shard's size and mtime)."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    if model.sharded:
        key, stamp = str(model.path.absolute()), {"shards": shard_stats(model)}
    else:
        st = model.path.stat()
        key, stamp = str(model.path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = index.get(key)
    if isinstance(entry, dict) and {k: v for k, v in entry.items() if k != "sha256"} == stamp and "sha256" in entry:
        return str(entry["sha256"])
    sha = model_sha256(model, progress)
    index[key] = {**stamp, "sha256": sha}
    write_atomic(index_path, json.dumps(index, indent=1))
    return sha


def cached_slice(model_path: str | os.PathLike[str], rng: LayerRange, n_layer: int,
                 progress: bool = True, *, sha256: str | None = None) -> Path:
    """Path of a slice holding layers ``rng`` of a model of ``n_layer`` layers, cut into
    ``cache_dir()/slices/<model_sha256[:16]>/`` on first use and reused while it verifies.

    ``model_path`` is a GGUF file or any shard of a split model, whose identity
    (:func:`nakshatra.gguf.shards.model_sha256`) keys the cache: the same slice as for the unsplit
    file. The identity is remembered in ``cache_dir()/slices/index.json`` (see
    :func:`_known_sha256`), so an unchanged model is not hashed again; a trusted ``sha256`` skips
    that (and then only the bytes :func:`slice_byte_ranges` lists are read). Concurrent calls are
    serialised by a file lock. Raises RangeError if ``rng`` goes beyond ``n_layer`` or ``n_layer``
    is not the model's layer count, SliceError as :func:`slice_model`.
    """
    model_path = Path(model_path).absolute()  # not resolved: a shard's siblings are found by name
    if not model_path.is_file():
        raise SliceError(f"{model_path}: no such model file; give the path of a .gguf file")
    if rng.end > n_layer:
        raise RangeError(f"layer range {rng.inclusive()} is beyond the model: it has {n_layer} "
                         f"layers, numbered 0..{n_layer - 1}")
    root = cache_dir() / "slices"
    root.mkdir(parents=True, exist_ok=True)
    model = open_model(model_path)
    with _locked(root / ".lock"):
        sha = sha256 or _known_sha256(model, root / "index.json", progress)
        path = root / sha[:16] / f"{model.stem}.{rng.inclusive()}.gguf"
        if path.exists():
            try:
                meta = _checked_meta(path)
                if (meta["nakshatra.model_sha256"] == sha and meta["nakshatra.layer_range_start"] == rng.start
                        and meta["nakshatra.layer_range_end"] == rng.end):
                    return path
            except SliceError:
                pass
            path.unlink()
        layout = _model_layout(model, sha)
        if layout.n_layer != n_layer:
            raise RangeError(f"{model_path} has {layout.n_layer} layers, not {n_layer}")
        _prepare_out_dir(path.parent)
        _cut(model, layout, [(rng, 0, 0, path)], progress)
    return path
