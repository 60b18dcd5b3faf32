"""A lightweight GGUF scanner and little-endian re-encoder, for slicing without parsing the vocabulary.

``gguf.GGUFReader`` turns every element of every metadata array into its own numpy view (the
262k-token vocabulary of gemma3-270m becomes about a million objects, 190 MB), and it cannot be
told not to. The slicer needs almost none of those values: it copies most key-value pairs unchanged. So
this module hand-parses the file, but only as a thin scanner over the ``gguf`` package's own
constants (``GGUF_MAGIC``, ``GGUFValueType``, ``GGMLQuantizationType``, ``GGML_QUANT_SIZES``,
``general.alignment``): :func:`scan` records where each key-value pair and each tensor info lies
in the file, decodes the scalar values, and skips over arrays (string arrays by their lengths)
without keeping them. :meth:`GGUFScan.value` decodes one value on request.

It accepts the files ``GGUFReader`` accepts (versions 2 and 3, either byte order) and refuses with
ValueError what it refuses (bad magic or version, unknown value or tensor types, duplicate keys
or tensor names, a bad ``general.alignment``, a quantized row that is not whole blocks, tensor
data past the end of the file, truncation anywhere); tests/test_slicer.py checks this against
``GGUFReader`` case by case.

For writing, :func:`encode_kv` encodes a value as ``GGUFWriter`` does (little-endian), and
:func:`copy_kv` streams a scanned pair to the output as ``GGUFWriter`` would re-encode the value
``GGUFReader`` decodes (so the bytes match a reader-to-writer rewrite exactly): the raw bytes
where that is the same, which is everything in a little-endian file except a BOOL value stored as
a byte other than 0/1 or a FLOAT32 NaN, which go through the same decode and pack as that rewrite.
"""

from __future__ import annotations

import math
import os
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

_V = GGUFValueType

SUPPORTED_VERSIONS = (2, GGUF_VERSION)
"""Versions ``GGUFReader`` reads."""

READER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")
"""Header fields ``GGUFReader`` lists among ``fields``; a file key of that name is a duplicate."""

_FORMATS = {_V.UINT8: "B", _V.INT8: "b", _V.UINT16: "H", _V.INT16: "h", _V.UINT32: "I",
            _V.INT32: "i", _V.FLOAT32: "f", _V.UINT64: "Q", _V.INT64: "q", _V.FLOAT64: "d",
            _V.BOOL: "?"}
"""struct codes of the fixed-size value types, as ``GGUFWriter`` packs them (standard sizes)."""

_SIZES = {t: struct.calcsize("<" + f) for t, f in _FORMATS.items()}

_PLAIN_TENSOR_TYPES = {GGMLQuantizationType.F16, GGMLQuantizationType.F32, GGMLQuantizationType.F64,
                       GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                       GGMLQuantizationType.I64}
"""Tensor types ``GGUFReader`` maps to a numpy element type; the others are blocks of bytes whose
row length must be a whole number of blocks."""

WINDOW = 1 << 20
"""Bytes read from the file at a time while scanning and copying."""

_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class Truncated(ValueError):
    """The file (or the head of it that :func:`scan` was allowed to read) ends before a value
    does; ``needed`` is the byte offset up to which the file must extend for that value."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


@dataclass(frozen=True)
class KVInfo:
    """Where one key-value pair lies in the file: the record ``[offset, end)`` (key length, key,
    type, value) and its value from ``value_offset``. ``scalar`` is the decoded value of a
    fixed-size type (as ``ReaderField.contents()`` gives it), None otherwise. Arrays: ``sub_type``
    (None for an empty array of an unknown type) and ``count`` elements."""

    key: str
    type: GGUFValueType
    offset: int
    value_offset: int
    end: int
    scalar: Any = None
    sub_type: GGUFValueType | None = None
    count: int = 0

    @property
    def copyable(self) -> bool:
        """False for an empty or nested array (``GGUFWriter`` cannot write those)."""
        return self.type != _V.ARRAY or (self.count > 0 and self.sub_type != _V.ARRAY)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor info. ``shape`` is in GGUF order (``ne0`` first), as ``ReaderTensor.shape``;
    ``offset`` is relative to the data section, ``data_offset`` absolute in the file."""

    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    offset: int
    data_offset: int
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFScan:
    """A scanned GGUF: every key-value pair in file order (``fields``, without the reader's
    ``GGUF.*`` header entries), the tensor infos in file order, the data alignment and the offset
    of the data section. ``byte_order`` is the struct prefix of the file's numbers."""

    path: Path
    byte_order: str
    version: int
    fields: dict[str, KVInfo]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int
    file_bytes: int

    def value(self, key: str) -> Any:
        """The value of ``key`` as ``GGUFReader``'s ``ReaderField.contents()`` gives it (int, float,
        bool, str or list; nested arrays flattened), or None if absent. Reads the file."""
        kv = self.fields.get(key)
        if kv is None:
            return None
        if kv.type not in (_V.STRING, _V.ARRAY):
            return kv.scalar
        with open(self.path, "rb") as f:
            cur = _Cursor(f.fileno(), self.file_bytes, kv.value_offset, self.byte_order)
            if kv.type == _V.STRING:
                return cur.read_string().decode("utf-8")
            return [x.decode("utf-8") if isinstance(x, bytes) else x for x in cur.read_array()]

    def array_items(self, fd: int, key: str) -> list[Any]:
        """The elements of array ``key`` read from ``fd`` (this file), strings as raw bytes: the
        values ``GGUFWriter`` would be given to write it again."""
        kv = self.fields[key]
        return _Cursor(fd, self.file_bytes, kv.value_offset, self.byte_order).read_array()


class _Cursor:
    """Sequential reads of a file of ``size`` bytes from ``pos``, through a window of pread bytes.
    ``order``: the struct byte-order prefix of the file."""

    def __init__(self, fd: int, size: int, pos: int, order: str = "<") -> None:
        self.fd, self.size, self.pos, self.order = fd, size, pos, order
        self.buf, self.base = b"", pos
        self.u32 = struct.Struct(order + "I")
        self.u64 = struct.Struct(order + "Q")

    def _need(self, n: int) -> int:
        """Make bytes ``[pos, pos+n)`` available; returns the index of ``pos`` in the window."""
        if self.pos + n > self.size:
            raise Truncated(f"unexpected end of file at byte {self.pos} (needs {n} more bytes, "
                            f"the file has {self.size})", self.pos + n)
        i = self.pos - self.base
        if i < 0 or i + n > len(self.buf):
            self.buf, self.base, i = os.pread(self.fd, max(n, WINDOW), self.pos), self.pos, 0
            if len(self.buf) < n:
                raise Truncated(f"unexpected end of file at byte {self.pos + len(self.buf)}", self.pos + n)
        return i

    def read(self, n: int) -> bytes:
        i = self._need(n)
        self.pos += n
        return self.buf[i:i + n]

    def unpack(self, st: struct.Struct) -> Any:
        i = self._need(st.size)
        self.pos += st.size
        return st.unpack_from(self.buf, i)[0]

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise Truncated(f"unexpected end of file at byte {self.size} (a value at byte {self.pos} "
                            f"needs {n} bytes)", self.pos + n)
        self.pos += n

    def read_string(self) -> bytes:
        return self.read(self.unpack(self.u64))

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` strings (a uint64 length, then the bytes), without keeping them."""
        u64, size = self.u64, self.size
        for _ in range(count):
            i = self._need(8)
            n = u64.unpack_from(self.buf, i)[0]
            if self.pos + 8 + n > size:
                raise Truncated(f"unexpected end of file at byte {size} (a string at byte {self.pos} "
                                f"has {n} bytes)", self.pos + 8 + n)
            self.pos += 8 + n

    def value_type(self) -> GGUFValueType:
        return _V(self.unpack(self.u32))

    def skip_array(self) -> tuple[GGUFValueType | None, int]:
        """Skip an array value (element type, count, elements); returns (element type, count).
        The element type of an empty array is not checked (None when unknown), as in GGUFReader."""
        raw, count = self.unpack(self.u32), self.unpack(self.u64)
        if count == 0:
            try:
                return _V(raw), 0
            except ValueError:
                return None, 0
        sub = _V(raw)
        if sub == _V.STRING:
            self.skip_strings(count)
        elif sub == _V.ARRAY:
            for _ in range(count):
                self.skip_array()
        else:
            self.skip(_SIZES[sub] * count)
        return sub, count

    def read_scalar(self, vtype: GGUFValueType) -> Any:
        """A fixed-size value decoded as GGUFReader does (numpy element, then ``tolist()``)."""
        return np.frombuffer(self.read(_SIZES[vtype]), np.dtype(self.order + _FORMATS[vtype])).tolist()[0]

    def read_array(self) -> list[Any]:
        """An array value's elements, decoded as GGUFReader does (strings as raw bytes; nested
        arrays flattened)."""
        raw, count = self.unpack(self.u32), self.unpack(self.u64)
        if count == 0:
            return []
        sub = _V(raw)
        if sub == _V.STRING:
            return [self.read_string() for _ in range(count)]
        if sub == _V.ARRAY:
            return [x for _ in range(count) for x in self.read_array()]
        data = self.read(_SIZES[sub] * count)
        return np.frombuffer(data, np.dtype(self.order + _FORMATS[sub])).tolist()


def _native_order() -> tuple[str, str]:
    return ("<", ">") if sys.byteorder == "little" else (">", "<")


def scan(path: str | os.PathLike[str], head: int | None = None) -> GGUFScan:
    """Scan a GGUF file's header, key-value pairs and tensor infos (see the module docstring).

    ``head``: read only the first ``head`` bytes of the file (the rest may not be there yet: a
    remote model being fetched into a sparse local copy, :mod:`nakshatra.gguf.remote`); the tensor
    data must still lie within the file's full size.

    Raises ValueError (UnicodeDecodeError for a key or tensor name that is not UTF-8) for a file
    ``GGUFReader`` would not open, :class:`Truncated` (a ValueError) where the file or its head
    ends too early, OSError if it cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        cur = _Cursor(f.fileno(), size if head is None else min(size, head), 0)
        if cur.unpack(_U32) != GGUF_MAGIC:
            raise ValueError("GGUF magic invalid")
        # as GGUFReader: read the version in host order; a zero low half means the other order
        host, other = _native_order()
        raw = cur.read(4)
        version = struct.unpack(host + "I", raw)[0]
        order = host
        if version & 0xFFFF == 0:
            order = other
            version = struct.unpack(other + "I", raw)[0]
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"file is GGUF version {version}; only versions "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))} can be read")
        cur.order, cur.u32, cur.u64 = order, struct.Struct(order + "I"), struct.Struct(order + "Q")
        tensor_count, kv_count = cur.unpack(cur.u64), cur.unpack(cur.u64)

        fields: dict[str, KVInfo] = {}
        for _ in range(kv_count):
            start = cur.pos
            key = cur.read_string().decode("utf-8")
            if key in fields or key in READER_FIELDS:
                raise ValueError(f"duplicate key {key} at byte {start}")
            vtype = cur.value_type()
            vstart, scalar, sub, count = cur.pos, None, None, 0
            if vtype == _V.STRING:
                cur.skip(cur.unpack(cur.u64))
            elif vtype == _V.ARRAY:
                sub, count = cur.skip_array()
            else:
                scalar = cur.read_scalar(vtype)
            fields[key] = KVInfo(key, vtype, start, vstart, cur.pos, scalar, sub, count)

        infos = []
        for _ in range(tensor_count):
            name = cur.read_string().decode("utf-8")
            n_dims = cur.unpack(cur.u32)
            shape = struct.unpack(f"{order}{n_dims}Q", cur.read(8 * n_dims))
            infos.append((name, shape, cur.unpack(cur.u32), cur.unpack(cur.u64)))

        alignment = GGUF_DEFAULT_ALIGNMENT
        kv = fields.get(Keys.General.ALIGNMENT)
        if kv is not None:
            if kv.type != _V.UINT32:
                raise ValueError(f"bad type for {Keys.General.ALIGNMENT}: {kv.type.name}, not UINT32")
            alignment = kv.scalar
            if alignment == 0 or alignment & (alignment - 1):
                raise ValueError(f"invalid alignment {alignment}: must be a non-zero power of two")
        data_offset = pad(cur.pos, alignment)

        tensors, names = [], set()
        for name, shape, raw_type, offset in infos:
            if name in names:
                raise ValueError(f"duplicate tensor {name}")
            names.add(name)
            ttype = GGMLQuantizationType(raw_type)
            if ttype not in GGML_QUANT_SIZES:
                raise ValueError(f"tensor {name}: type {ttype.name} has no known size")
            block_size, type_size = GGML_QUANT_SIZES[ttype]
            n_elements = math.prod(shape)
            n_bytes = n_elements * type_size // block_size
            if ttype not in _PLAIN_TENSOR_TYPES and (not shape or shape[0] % block_size):
                raise ValueError(f"tensor {name}: row size {shape[0] if shape else None} is not a "
                                 f"multiple of the {ttype.name} block size ({block_size})")
            data = data_offset + offset
            if n_bytes and data + n_bytes > size:
                raise ValueError(f"tensor {name}: its data (bytes {data}..{data + n_bytes}) is beyond "
                                 f"the end of the file ({size} bytes)")
            tensors.append(TensorInfo(name, shape, ttype, offset, data, n_elements, n_bytes))
    return GGUFScan(path=path, byte_order=order, version=version, fields=fields, tensors=tensors,
                    alignment=alignment, data_offset=data_offset, file_bytes=size)


# --- writing, little-endian as GGUFWriter ---------------------------------------------------------

def pad(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment`` (``GGUFWriter.ggml_pad``)."""
    return (n + alignment - 1) // alignment * alignment


def header(tensor_count: int, kv_count: int) -> bytes:
    """The file header ``GGUFWriter`` writes: magic, version, tensor and key-value counts."""
    return struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, tensor_count, kv_count)


def encode_string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return _U64.pack(len(b)) + b


def encode_value(value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> bytes:
    """A value without its type tag, as ``GGUFWriter`` packs it (strings: str or raw bytes;
    arrays: a non-empty list with an explicit ``sub_type``)."""
    fmt = _FORMATS.get(vtype)
    if fmt is not None:
        return struct.pack("<" + fmt, value)
    if vtype == _V.STRING:
        return encode_string(value)
    if vtype == _V.ARRAY:
        if sub_type is None or not isinstance(value, (list, tuple)) or not value:
            raise ValueError("a GGUF array needs an element type and at least one element")
        sub_fmt = _FORMATS.get(sub_type)
        head = struct.pack("<IQ", sub_type, len(value))
        if sub_fmt is not None:
            return head + struct.pack(f"<{len(value)}{sub_fmt}", *value)
        return head + b"".join(encode_value(v, sub_type) for v in value)
    raise ValueError(f"cannot encode a GGUF value of type {vtype!r}")


def encode_kv(key: str, value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> bytes:
    """A whole key-value record as ``GGUFWriter.write_kv_data_to_file`` writes it."""
    return encode_string(key) + _U32.pack(vtype) + encode_value(value, vtype, sub_type)


def _chunks(fd: int, offset: int, n: int, size: int = WINDOW) -> Iterator[bytes]:
    """Bytes ``[offset, offset+n)`` of ``fd`` in chunks of exactly ``size`` (the last one shorter)."""
    end = offset + n
    while offset < end:
        want = min(size, end - offset)
        chunk = os.pread(fd, want, offset)
        while 0 < len(chunk) < want:  # a short read: complete the chunk
            more = os.pread(fd, want - len(chunk), offset + len(chunk))
            if not more:
                break
            chunk += more
        if len(chunk) < want:
            raise ValueError(f"unexpected end of file at byte {offset + len(chunk)}")
        yield chunk
        offset += want


def _canonical(chunk: bytes, sub: GGUFValueType, order: str) -> bytes:
    """Fixed-size array elements as GGUFWriter writes what GGUFReader decodes: the same bytes in
    little-endian order, except BOOL bytes other than 0/1 and FLOAT32 NaNs, which take the same path
    as that rewrite (``tolist()`` then ``struct.pack``)."""
    arr = np.frombuffer(chunk, np.dtype(order + _FORMATS[sub]))
    if order != "<":  # a byte-order cast swaps the bytes exactly, NaN payloads included
        arr = arr.astype(arr.dtype.newbyteorder("<"))
        chunk = arr.tobytes()
    if sub == _V.BOOL:
        if not chunk.translate(None, b"\x00\x01"):
            return chunk
    elif sub != _V.FLOAT32 or not np.isnan(arr).any():
        return chunk
    return struct.pack(f"<{len(arr)}{_FORMATS[sub]}", *arr.tolist())


def copy_kv(scan: GGUFScan, fd: int, kv: KVInfo, write: Callable[[bytes], Any]) -> int:
    """Write key-value pair ``kv`` of ``scan`` (open as ``fd``) as ``GGUFWriter`` writes the value
    ``GGUFReader`` reads, streamed ``WINDOW`` bytes at a time; returns the bytes written. Raises
    ValueError for an empty or nested array."""
    if not kv.copyable:
        raise ValueError(f"metadata key {kv.key} is an empty or nested array")
    n = 0

    def out(b: bytes) -> None:
        nonlocal n
        write(b)
        n += len(b)

    out(encode_string(kv.key) + _U32.pack(kv.type))
    order = scan.byte_order
    if kv.type == _V.STRING:
        length = kv.end - kv.value_offset - 8
        out(_U64.pack(length))
        for chunk in _chunks(fd, kv.value_offset + 8, length):
            out(chunk)
    elif kv.type != _V.ARRAY:
        out(encode_value(kv.scalar, kv.type))
    else:
        assert kv.sub_type is not None
        out(struct.pack("<IQ", kv.sub_type, kv.count))
        start = kv.value_offset + 12
        if kv.sub_type == _V.STRING and order != "<":
            cur = _Cursor(fd, scan.file_bytes, start, order)
            for _ in range(kv.count):
                out(encode_string(cur.read_string()))
        elif kv.sub_type == _V.STRING:
            for chunk in _chunks(fd, start, kv.end - start):
                out(chunk)
        else:
            step = WINDOW // 8 * 8  # whole elements in every chunk
            for chunk in _chunks(fd, start, kv.end - start, step):
                out(_canonical(chunk, kv.sub_type, order))
    return n
