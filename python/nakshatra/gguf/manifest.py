"""The manifest ``nak slice`` writes beside the slices: which file holds which layers of which model.

JSON, ``format_version`` 1::

    {"format_version": 1,
     "model": {"name": "smollm2", "arch": "llama", "n_embd": 576, "n_layer": 30,
               "sha256": "<hex of the whole original file>", "bytes": 98362432},
     "slices": [{"file": "smollm2.0-9.gguf", "layer_start": 0, "layer_end": 10,
                 "bytes": 40000000, "sha256": "<hex of the whole slice file>",
                 "tensor_data_sha256": "<hex, see slicer.verify_slice>"}, ...]}

``layer_end`` is exclusive; ``file`` is relative to the manifest's directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SliceError
from ..ranges import LayerRange

FORMAT_VERSION = 1
CHUNK = 1 << 20

_MODEL_KEYS = {"name": str, "arch": str, "n_embd": int, "n_layer": int, "sha256": str, "bytes": int}
_SLICE_KEYS = {"file": str, "layer_start": int, "layer_end": int, "bytes": int, "sha256": str,
               "tensor_data_sha256": str}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a whole file, read in 1 MiB chunks (memory stays constant)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through ``.<name>.<pid>.tmp`` in the same directory and
    ``os.replace``, so readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class SliceInfo:
    """One slice file: ``file`` (name relative to the manifest's directory), global layers
    ``layer_start .. layer_end-1``, its size in ``bytes``, the hex sha256 of the whole file and of
    its tensor data (``nakshatra.tensor_data_sha256``)."""

    file: str
    layer_start: int
    layer_end: int
    bytes: int
    sha256: str
    tensor_data_sha256: str

    @property
    def range(self) -> LayerRange:
        """The slice's global layer range (half-open)."""
        return LayerRange(self.layer_start, self.layer_end)


@dataclass
class Manifest:
    """A model cut into slices. ``model`` holds ``name`` (file stem), ``arch``, ``n_embd``,
    ``n_layer``, ``sha256`` (hex, whole original file) and ``bytes`` (original file size);
    ``slices`` are sorted by layer and cover ``0..n_layer-1`` exactly."""

    model: dict[str, Any]
    slices: list[SliceInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """The manifest as indented JSON text."""
        return json.dumps(asdict(self), indent=2) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the manifest to ``path`` atomically. Raises OSError if it cannot be written."""
        write_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> Manifest:
        """Build and validate a manifest from parsed JSON. Raises SliceError naming ``source``
        and what is wrong (wrong version, missing or mistyped key, slices that do not cover the
        model's layers exactly)."""
        def bad(why: str) -> SliceError:
            return SliceError(f"{source} is not a valid Nakshatra manifest: {why}; re-run nak slice")

        if not isinstance(data, dict):
            raise bad("expected a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise bad(f"format_version is {data.get('format_version')!r}, this version reads "
                      f"{FORMAT_VERSION}")
        model, slices = data.get("model"), data.get("slices")
        _check_keys(model, _MODEL_KEYS, "model", bad)
        if not isinstance(slices, list) or not slices:
            raise bad("'slices' must be a non-empty list")
        for i, s in enumerate(slices):
            _check_keys(s, _SLICE_KEYS, f"slices[{i}]", bad)
        infos = sorted((SliceInfo(**{k: s[k] for k in _SLICE_KEYS}) for s in slices),
                       key=lambda s: s.layer_start)
        expected = 0
        for s in infos:
            if s.layer_start != expected or s.layer_end <= s.layer_start:
                raise bad(f"slice {s.file} holds layers [{s.layer_start}, {s.layer_end}) but the "
                          f"next slice should start at layer {expected}")
            expected = s.layer_end
        if expected != model["n_layer"]:
            raise bad(f"the slices end at layer {expected}, the model has {model['n_layer']}")
        return cls(model={k: model[k] for k in _MODEL_KEYS}, slices=infos)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read and validate a manifest file. Raises SliceError if it is missing, not JSON, or
        not a valid manifest (see :meth:`from_dict`)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise SliceError(f"cannot read manifest {path}: {e.strerror or e}") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SliceError(f"{path} is not valid JSON ({e}); re-run nak slice") from e
        return cls.from_dict(data, str(path))

    @property
    def ranges(self) -> list[LayerRange]:
        """The slices' layer ranges, in order."""
        return [s.range for s in self.slices]


def _check_keys(obj: Any, spec: dict[str, type], where: str, bad: Any) -> None:
    if not isinstance(obj, dict):
        raise bad(f"'{where}' must be an object")
    for key, typ in spec.items():
        value = obj.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise bad(f"'{where}.{key}' must be a {typ.__name__}, got {value!r}")
        if typ is int and value < 0:
            raise bad(f"'{where}.{key}' must be >= 0, got {value}")
