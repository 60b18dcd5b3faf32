"""Models published in shards (``llama-gguf-split``), read as the one model they are.

A split model is ``NAME-00001-of-0000N.gguf`` .. ``NAME-0000N-of-0000N.gguf`` (llama.cpp's
``llama_split_path``, numbers from 1). Its writers (``llama-gguf-split --split`` and
``gguf.GGUFWriter`` with ``split_max_size`` / ``split_max_tensors``) put all of the model's
metadata in shard 1 followed by ``split.no`` (UINT16, 0-based), ``split.count`` (UINT16) and
``split.tensors.count`` (INT32, tensors over all shards), in an order that differs between them;
every other shard holds only those three keys. Tensors keep the model's order across the shards.

:func:`open_model` takes any shard (or a plain single-file GGUF), finds its siblings by name in
the same directory, checks that they belong together and returns a :class:`GGUFModel`: one merged
:class:`~nakshatra.gguf.scan.GGUFScan` (shard 1's keys without ``split.*``, every shard's tensors)
and which file holds each tensor. Siblings are found from the path as given, never from a resolved
one: in a Hugging Face cache the snapshot files are symlinks to blobs named by their hash.

**Identity.** A sharded model's identity (``nakshatra.model_sha256`` of its slices, a manifest's
``model.sha256``) is the sha256 of the model as *one* file in GGUF's canonical layout, what
``GGUFWriter`` writes (:func:`write_gguf`): the header, the key-value pairs without ``split.*``,
the tensor infos with offsets from 0 each padded to the alignment, padding to the alignment, then
each tensor's data padded to the alignment; ``model_bytes`` is that file's size. It is streamed
from the shards. For both built-in models the canonical stream of the unsplit file is that file
byte for byte (tests/test_shards.py), so slices cut from the shards are byte-identical to slices
cut from the unsplit file, ``nakshatra.model_sha256`` included. A single file keeps the sha256 of
its bytes.

:func:`write_shards` writes what ``llama-gguf-split --split`` writes, streamed.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gguf import GGUF_DEFAULT_ALIGNMENT, GGUFValueType, Keys

from ..errors import SliceError
from .manifest import CHUNK
from .scan import GGUFScan, KVInfo, TensorInfo, copy_kv, encode_kv, encode_string, header, pad

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = (Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT,
                                        Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)
"""The keys a shard carries beyond the model's (``split.no``, ``split.count``, ``split.tensors.count``)."""

Sink = Callable[[bytes], Any]


def shard_path(prefix: str | os.PathLike[str], index: int, count: int) -> Path:
    """The file of shard ``index`` (0-based) of ``count``: ``<prefix>-%05d-of-%05d.gguf`` with
    ``index + 1`` (llama.cpp's ``llama_split_path``)."""
    return Path(f"{os.fspath(prefix)}-{index + 1:05d}-of-{count:05d}.gguf")


def shard_prefix(path: str | os.PathLike[str], index: int, count: int) -> Path | None:
    """The prefix of shard file ``path`` if its name ends in the suffix of shard ``index``
    (0-based) of ``count``, else None (llama.cpp's ``llama_split_prefix``)."""
    s, suffix = os.fspath(path), f"-{index + 1:05d}-of-{count:05d}.gguf"
    return Path(s[:-len(suffix)]) if s.endswith(suffix) and len(s) > len(suffix) else None


@dataclass(frozen=True)
class GGUFModel:
    """A model in one GGUF file or in shards.

    ``paths``: its files, shard order (one for a single file; the path as given, not resolved);
    ``scan``: the merged view, shard 1's keys without ``split.*`` and all tensors in order (a
    tensor's ``data_offset`` is in its own file); ``files``: each file's own scan; ``shard_of``:
    tensor name -> index into ``paths``; ``stem``: the model's name (the file's stem, or the shards' prefix); ``sharded``:
    the files carry ``split.*`` keys (then :func:`model_sha256` is the canonical stream's)."""

    paths: tuple[Path, ...]
    scan: GGUFScan
    files: tuple[GGUFScan, ...]
    shard_of: dict[str, int]
    stem: str
    sharded: bool

    @property
    def path(self) -> Path:
        """The file llama.cpp loads the model from: the single file, or shard 1."""
        return self.paths[0]

    def open(self) -> ModelFiles:
        """The model's files open for reading (a context manager). Raises SliceError naming a
        file that cannot be opened."""
        return ModelFiles(self)


class ModelFiles:
    """The open files of a :class:`GGUFModel`: key-value pairs come from the first, each tensor's
    data from the file that holds it. A context manager; closes every file on exit."""

    def __init__(self, model: GGUFModel) -> None:
        self.model, self._fds = model, list[int]()
        try:
            for p in model.paths:
                self._fds.append(os.open(p, os.O_RDONLY))
        except OSError as e:
            self.close()
            raise SliceError(f"cannot read {e.filename}: {e.strerror or e}; check the file is there "
                             "and readable") from e

    def __enter__(self) -> ModelFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every file (again: no-op)."""
        while self._fds:
            os.close(self._fds.pop())

    @property
    def kv_fd(self) -> int:
        """The file holding the model's key-value pairs (shard 1)."""
        return self._fds[0]

    def stream(self, t: TensorInfo, sinks: Sequence[Sink]) -> None:
        """Feed tensor ``t``'s ``n_bytes`` data bytes to every sink, ``CHUNK`` bytes at a time.
        Raises SliceError naming the file if it ends early."""
        i = self.model.shard_of[t.name]
        offset, end = t.data_offset, t.data_offset + t.n_bytes
        while offset < end:
            chunk = os.pread(self._fds[i], min(CHUNK, end - offset), offset)
            if not chunk:
                raise SliceError(f"{self.model.paths[i]} ends at byte {offset}, inside tensor {t.name}: "
                                 "the file is truncated; download or copy it again")
            for sink in sinks:
                sink(chunk)
            offset += len(chunk)

    def copy_kv(self, kv: KVInfo, write: Sink) -> int:
        """Write key-value pair ``kv`` of the model (see :func:`nakshatra.gguf.scan.copy_kv`);
        returns the bytes written. Raises ValueError if the file changed under us."""
        return copy_kv(self.model.scan, self.kv_fd, kv, write)


def tensor_infos(tensors: Sequence[tuple[str, TensorInfo]], alignment: int) -> bytes:
    """The tensor-info section as GGUFWriter writes it: each name, dimensions, type and data
    offset from 0, each tensor's data padded to ``alignment``."""
    out, offset = bytearray(), 0
    for name, t in tensors:
        dims = len(t.shape)
        out += encode_string(name) + struct.pack(f"<I{dims}QIQ", dims, *t.shape, t.tensor_type, offset)
        offset += pad(t.n_bytes, alignment)
    return bytes(out)


def write_gguf(write: Sink, files: ModelFiles, kvs: Sequence[KVInfo | bytes],
               tensors: Sequence[tuple[str, TensorInfo]], alignment: int,
               on_data: Callable[[int], Any] | None = None) -> int:
    """Stream a GGUF as ``GGUFWriter`` writes it to ``write``: header, the key-value pairs
    (a :class:`KVInfo` of the model, copied; or an encoded record), the tensor infos (``(name,
    tensor)`` pairs, data read through ``files``), padding to ``alignment``, each tensor's data
    padded to ``alignment``. ``on_data(n)`` is called with the byte count of each data chunk.
    Returns the bytes written. Raises SliceError (a truncated model file), ValueError (metadata
    that changed under us) and what ``write`` raises."""
    n = 0

    def out(b: bytes) -> None:
        nonlocal n
        write(b)
        n += len(b)

    out(header(len(tensors), len(kvs)))
    for kv in kvs:
        if isinstance(kv, bytes):
            out(kv)
        else:
            n += files.copy_kv(kv, write)
    out(tensor_infos(tensors, alignment))
    out(bytes(pad(n, alignment) - n))
    sinks: list[Sink] = [write] if on_data is None else [write, lambda c: on_data(len(c))]
    for _, t in tensors:
        files.stream(t, sinks)
        n += t.n_bytes
        out(bytes(pad(t.n_bytes, alignment) - t.n_bytes))
    return n


# --- reading shards -------------------------------------------------------------------------

def _split_keys(scan: GGUFScan) -> tuple[Any, Any, Any]:
    return scan.value(SPLIT_NO), scan.value(SPLIT_COUNT), scan.value(SPLIT_TENSORS)


def _foreign(path: Path, why: str, given: Path) -> SliceError:
    return SliceError(f"{path} is not a shard of the model {given.name} is ({why}); put that "
                      "model's own shard there (download it again)")


def _siblings(path: Path, no: int, count: int) -> tuple[Path, list[Path]]:
    prefix = shard_prefix(path, no, count)
    if prefix is None:
        raise SliceError(f"{path} is shard {no + 1} of {count} of a split model, but its name does "
                         f"not end in -{no + 1:05d}-of-{count:05d}.gguf; give the shards the names "
                         "llama-gguf-split gave them")
    paths = [shard_path(prefix, i, count) for i in range(count)]
    for i, p in enumerate(paths):
        if not p.is_file():
            raise SliceError(f"{p}: no such file, shard {i + 1} of {count} of {prefix.name}; put all "
                             f"{count} shards in {p.parent}")
    return prefix, paths


def _check_shard(scan: GGUFScan, i: int, keys: tuple[int, int, Any], first: GGUFScan, given: Path) -> None:
    """Shard ``i`` carries ``split.no == i`` and the given shard's count and tensor total, and
    a scalar or string key it shares with shard 1 has shard 1's value."""
    count, total = keys[1:]
    got = _split_keys(scan)
    if got != (i, count, total):
        raise _foreign(scan.path, "its split.no/split.count/split.tensors.count are "
                       f"{'/'.join(map(str, got))}, not {i}/{count}/{total}", given)
    if scan is first:
        return
    for key, kv in scan.fields.items():
        other = first.fields.get(key)
        if other is None or key in SPLIT_KEYS or kv.type == GGUFValueType.ARRAY:
            continue
        if other.type != kv.type or first.value(key) != scan.value(key):
            raise _foreign(scan.path, f"its {key} differs from shard 1's", given)


def _check_layers(model: GGUFModel) -> None:
    """Every ``blk.N`` tensor within ``block_count`` and every layer present."""
    arch = model.scan.value("general.architecture")
    n_layer = model.scan.value(f"{arch}.block_count")
    if not isinstance(n_layer, int):
        return
    seen = set()
    for t in model.scan.tensors:
        if t.name.startswith("blk."):
            il = int(t.name.split(".", 2)[1])
            if il >= n_layer:
                raise _foreign(model.paths[model.shard_of[t.name]], f"it holds {t.name} but the model "
                               f"has {n_layer} layers", model.path)
            seen.add(il)
    missing = sorted(set(range(n_layer)) - seen)
    if missing:
        raise SliceError(f"the shards of {model.stem} in {model.path.parent} hold no tensor of layer "
                         f"{missing[0]} of {n_layer}; a shard is from another model: download them again")


def open_model(path: str | os.PathLike[str]) -> GGUFModel:
    """The model at ``path``: a single GGUF file, or any shard of a split model (all its shards
    are scanned and checked: every file is there, each carries the same ``split.count`` and
    ``split.tensors.count`` and its own ``split.no``, the tensors add up to ``split.tensors.count``
    with no name twice, scalar keys a shard shares with shard 1 agree, every ``blk.N`` tensor is
    within the model's layers and every layer has one). Reads metadata only.

    Raises SliceError naming the file: missing, unreadable or not a GGUF, a shard whose name is
    not llama-gguf-split's, a missing sibling, or a shard that does not belong (the message names
    the fix).
    """
    from .slicer import scan_gguf

    p = Path(path)
    given = scan_gguf(p)
    no, count, total = _split_keys(given)
    if count is None:
        return GGUFModel(paths=(p,), scan=given, files=(given,), shard_of={t.name: 0 for t in given.tensors},
                         stem=p.stem, sharded=False)
    if not isinstance(no, int) or not isinstance(count, int) or not 0 <= no < count:
        raise SliceError(f"{p}: invalid split.no {no!r} / split.count {count!r}; the shard is "
                         "damaged: download it again")
    if count == 1:
        prefix, paths = shard_prefix(p, 0, 1) or p.with_suffix(""), [p]
    else:
        prefix, paths = _siblings(p, no, count)
    scans = [given if i == no else scan_gguf(q) for i, q in enumerate(paths)]
    shard_of: dict[str, int] = {}
    for i, s in enumerate(scans):
        _check_shard(s, i, (no, count, total), scans[0], p)
        for t in s.tensors:
            if t.name in shard_of:
                raise SliceError(f"{paths[shard_of[t.name]]} and {s.path} both hold tensor {t.name}: one "
                                 "of them is not a shard of this split (another model, or another cut "
                                 "of it); download the shards again")
            shard_of[t.name] = i
    if len(shard_of) != total:
        raise SliceError(f"the shards of {prefix.name} hold {len(shard_of)} tensors, not the "
                         f"{total} their split.tensors.count says; a shard is from another model: "
                         "download them again")
    merged = replace(scans[0], fields={k: v for k, v in scans[0].fields.items() if k not in SPLIT_KEYS},
                     tensors=[t for s in scans for t in s.tensors])
    model = GGUFModel(paths=tuple(paths), scan=merged, files=tuple(scans), shard_of=shard_of,
                      stem=prefix.name, sharded=True)
    _check_layers(model)
    return model


# --- identity -------------------------------------------------------------------------------

def _canonical(model: GGUFModel, files: ModelFiles, write: Sink, on_data: Callable[[int], Any] | None) -> int:
    scan = model.scan
    return write_gguf(write, files, list(scan.fields.values()), [(t.name, t) for t in scan.tensors],
                      scan.alignment, on_data)


def model_bytes(model: GGUFModel) -> int:
    """The model's size in bytes: the single file's, or the canonical single file's (module
    docstring) for shards. Reads the metadata only."""
    if not model.sharded:
        return model.path.stat().st_size
    scan, n = model.scan, 0

    def count(b: bytes) -> None:
        nonlocal n
        n += len(b)

    with model.open() as files:
        n += len(header(len(scan.tensors), len(scan.fields)))
        for kv in scan.fields.values():
            files.copy_kv(kv, count)
    n += len(tensor_infos([(t.name, t) for t in scan.tensors], scan.alignment))
    return pad(n, scan.alignment) + sum(pad(t.n_bytes, scan.alignment) for t in scan.tensors)


def model_sha256(model: GGUFModel, progress: bool = False) -> str:
    """The model's identity, hex: sha256 of the single file, or of the canonical single file
    (module docstring) streamed from the shards, with a byte progress bar on stderr when
    ``progress``. Raises SliceError naming a file that is truncated or unreadable."""
    from .manifest import sha256_file
    from .slicer import byte_progress

    if not model.sharded:
        return sha256_file(model.path)
    h = hashlib.sha256()
    total = sum(t.n_bytes for t in model.scan.tensors)
    with byte_progress(progress) as bar, model.open() as files:
        task = bar.add_task(f"hashing {len(model.paths)} shards of {model.stem}", total=total) if bar else None
        try:
            _canonical(model, files, h.update, (lambda n: bar.advance(task, n)) if bar else None)
        except ValueError as e:
            raise SliceError(f"cannot read the metadata of {model.path}: {e}; is the file complete?") from e
    return h.hexdigest()


def shard_stats(model: GGUFModel) -> list[list[int]]:
    """``[size, mtime_ns]`` of each file of the model, to tell whether it changed."""
    return [[st.st_size, st.st_mtime_ns] for st in (p.stat() for p in model.paths)]


# --- writing shards -------------------------------------------------------------------------

def _plan(tensors: Sequence[TensorInfo], max_bytes: int | None, max_tensors: int | None) -> list[list[TensorInfo]]:
    """llama-gguf-split's cut: a new shard when the tensors so far (each padded to 32 bytes)
    plus the next would exceed ``max_bytes``, or every ``max_tensors`` tensors."""
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for i, t in enumerate(tensors):
        n = pad(t.n_bytes, GGUF_DEFAULT_ALIGNMENT)
        if (max_bytes is not None and size + n > max_bytes) or (max_tensors is not None and i > 0
                                                               and i % max_tensors == 0):
            if not groups[-1]:
                raise SliceError(f"tensor {t.name} ({t.n_bytes} bytes) alone is over the shard size "
                                 f"limit {max_bytes}; give a larger limit")
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    return groups


def write_shards(model_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 max_bytes: int | None = None, max_tensors: int | None = None,
                 prefix: str | None = None, progress: bool = False) -> list[Path]:
    """Split a model into ``<out_dir>/<prefix>-0000i-of-0000n.gguf`` as ``llama-gguf-split
    --split`` does, byte for byte (``--split-max-size max_bytes`` or ``--split-max-tensors
    max_tensors``; give one): shard 1 holds every key of the model then ``split.no``,
    ``split.tensors.count``, ``split.count`` (in that order: llama-gguf-split sets the count
    last; ``GGUFWriter`` puts it second), the others those three keys; tensors in the model's
    order, data padded to 32 bytes (shard 1: the model's alignment). Streamed in ``CHUNK`` reads.
    ``out_dir`` is created if needed; ``prefix`` defaults to the model's stem; the model may
    itself be any shard of a split model.
    Returns the paths in order. A byte progress bar on stderr when ``progress``.

    Raises SliceError as :func:`open_model`, for a tensor larger than ``max_bytes``, or a write
    that fails (naming the file).
    """
    from .slicer import byte_progress

    if (max_bytes is None) == (max_tensors is None):
        raise SliceError("give exactly one of max_bytes or max_tensors")
    model = open_model(model_path)
    scan = model.scan
    groups = _plan(scan.tensors, max_bytes, max_tensors)
    base = Path(out_dir) / (prefix or model.stem)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SliceError(f"cannot create {base.parent}: {e.strerror or e}; choose a writable directory") from e
    paths = [shard_path(base, i, len(groups)) for i in range(len(groups))]
    total = len(scan.tensors)
    with byte_progress(progress) as bar, model.open() as files:
        task = bar.add_task("sharding", total=sum(t.n_bytes for t in scan.tensors)) if bar else None
        for i, (path, group) in enumerate(zip(paths, groups)):
            split = [encode_kv(SPLIT_NO, i, GGUFValueType.UINT16),
                     encode_kv(SPLIT_TENSORS, total, GGUFValueType.INT32),
                     encode_kv(SPLIT_COUNT, len(groups), GGUFValueType.UINT16)]
            kvs: list[KVInfo | bytes] = [*scan.fields.values(), *split] if i == 0 else split
            alignment = scan.alignment if i == 0 else GGUF_DEFAULT_ALIGNMENT
            try:
                with open(path, "wb") as f:
                    write_gguf(f.write, files, kvs, [(t.name, t) for t in group], alignment,
                               (lambda n: bar.advance(task, n)) if bar else None)
            except OSError as e:
                path.unlink(missing_ok=True)
                raise SliceError(f"cannot write {path}: {e.strerror or e}; choose a writable "
                                 "directory with free space") from e
    return paths
