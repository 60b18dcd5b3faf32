#!/usr/bin/env python3
"""Prepare the patched llama.cpp source tree that the build compiles.

Called by ``cpp/cmake/llama.cmake`` at configure time; prints the prepared source directory on
its last line of stdout. Standard library only (it runs inside pip's isolated build environment).

Where the pristine source comes from, first match wins:

1. ``--source DIR`` (the CMake variable / environment variable ``NAKSHATRA_LLAMA_CPP_DIR``);
2. a checkout at ``<project>/llama.cpp`` if one is there;
3. the ``vendor/llama.cpp`` tree of the ``llama-cpp-python`` sdist named in ``patches/llama.cpp.pin``,
   downloaded with ``python -m pip download`` into the cache and checked against its sha256.

The pristine tree is never modified. It is mirrored into ``<cache>/llama.cpp/src-<key>`` and the
patches in ``patches/*.patch`` are applied to the mirror. Files are written only when their content
changes, so their mtimes stay put and the persistent build tree beside the mirror recompiles only
what a patch touched. A file that an earlier patch set touched and the current one does not is
restored from the pristine tree. Patches are applied with ``git apply``, ``patch -p1`` or the
pure-Python ``patch-ng`` (whichever is there first; ``NAKSHATRA_PATCH_TOOL`` forces one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


class PrepareError(RuntimeError):
    """The llama.cpp source could not be prepared; the message names the fix."""


def read_pin(path: Path) -> dict[str, str]:
    """Parse ``key = value`` lines of the pin file into a dict."""
    pin: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            pin[key.strip()] = value.strip()
    return pin


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(pin: dict[str, str], cache: Path) -> Path:
    """Download (once) and extract the pinned sdist; return its llama.cpp directory."""
    name, version = pin["sdist_package"], pin["sdist_version"]
    want = pin["sdist_sha256"]
    root = cache / "llama.cpp" / f"sdist-{version}-{want[:12]}"
    tree = root / "tree"
    done = root / "extracted.ok"
    if done.exists():
        return tree / pin["sdist_subdir"]
    dl = root / "download"
    dl.mkdir(parents=True, exist_ok=True)
    archives = sorted(dl.glob("*.tar.gz"))
    if not archives:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name,
               f"{name}=={version}", "-d", str(dl), "--quiet"]
        log(f"downloading the pinned llama.cpp source ({name}=={version} sdist)")
        r = subprocess.run(cmd)
        archives = sorted(dl.glob("*.tar.gz"))
        if r.returncode != 0 or not archives:
            raise PrepareError(
                f"could not download {name}=={version} with pip; check the network, or point "
                "NAKSHATRA_LLAMA_CPP_DIR at a llama.cpp checkout")
    got = sha256_file(archives[0])
    if got != want:
        archives[0].unlink()
        raise PrepareError(f"{archives[0].name}: sha256 {got} != pinned {want}; the file was "
                           "removed, run the build again to fetch it afresh")
    tmp = Path(tempfile.mkdtemp(dir=root))
    with tarfile.open(archives[0]) as tf:
        top = tf.getnames()[0].split("/")[0]
        prefix = f"{top}/{pin['sdist_subdir']}/"
        members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(top) + 1:]
        tf.extractall(tmp, members=members, filter="data")
    if tree.exists():
        shutil.rmtree(tree)
    tmp.rename(tree)
    done.write_text(got + "\n")
    return tree / pin["sdist_subdir"]


def patch_targets(patch: Path) -> list[str]:
    """Files a unified diff modifies (its ``+++ b/...`` lines)."""
    out = []
    for line in patch.read_text().splitlines():
        if line.startswith("+++ "):
            p = line[4:].split("\t")[0].strip()
            if p != "/dev/null":
                out.append(p[2:] if p.startswith("b/") else p)
    return out


def apply_patches(pristine: Path, patches: list[Path]) -> dict[str, bytes]:
    """Apply ``patches`` to copies of the files they touch; return {relpath: patched bytes}."""
    touched = sorted({t for p in patches for t in patch_targets(p)})
    if not touched:
        return {}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        for rel in touched:
            src = pristine / rel
            if src.exists():
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, work / rel)
        tool = os.environ.get("NAKSHATRA_PATCH_TOOL") or _patch_tool()
        for p in patches:
            _apply_one(tool, p, work, pristine)
        return {rel: (work / rel).read_bytes() for rel in touched}


def _patch_tool() -> str:
    """git apply if git is there, else patch(1), else the pure-Python patch-ng (a build
    requirement, so a machine with only Python, a compiler and CMake can build)."""
    if shutil.which("git"):
        return "git"
    if shutil.which("patch"):
        return "patch"
    return "patch_ng"


def _apply_one(tool: str, patch: Path, work: Path, pristine: Path) -> None:
    hint = f"is {pristine} the pinned llama.cpp? (see patches/llama.cpp.pin)"
    if tool == "patch_ng":
        try:
            import patch_ng
        except ImportError:
            raise PrepareError("applying patches needs git, patch or the patch-ng package: "
                               "apt-get install git, or pip install patch-ng") from None
        ps = patch_ng.fromfile(str(patch))
        if not ps or not ps.apply(strip=0, root=str(work)):  # it drops a/ b/ itself
            raise PrepareError(f"patch {patch.name} does not apply; {hint}")
        return
    if tool == "git":
        cmd = ["git", "apply", "--whitespace=nowarn", "-p1", str(patch)]
    else:
        cmd = ["patch", "-p1", "--forward", "--quiet", "-i", str(patch)]
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True,
                       env={**os.environ, "GIT_DIR": str(work / ".nogit")})
    if r.returncode != 0:
        raise PrepareError(f"patch {patch.name} does not apply to {pristine}: "
                           f"{r.stderr.strip() or r.stdout.strip()}; {hint}")


def write_if_changed(path: Path, data: bytes) -> bool:
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".nak-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def mirror(pristine: Path, dest: Path, skip: set[str]) -> int:
    """Copy files of ``pristine`` whose size or mtime differ into ``dest`` (rsync-like)."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(pristine):
        dirnames[:] = [d for d in dirnames if d not in (".git", "build")]
        rel_dir = Path(dirpath).relative_to(pristine)
        for fn in filenames:
            rel = (rel_dir / fn).as_posix()
            if rel in skip or fn == ".git":  # a submodule's gitlink would point git elsewhere
                continue
            s, d = Path(dirpath) / fn, dest / rel
            st = s.stat()
            try:
                dt = d.stat()
                if dt.st_size == st.st_size and int(dt.st_mtime) == int(st.st_mtime):
                    continue
            except FileNotFoundError:
                pass
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, d)
            n += 1
    return n


def log(msg: str) -> None:
    print(f"-- nakshatra: {msg}", file=sys.stderr, flush=True)


def prepare(project: Path, cache: Path, source: str | None) -> tuple[Path, dict]:
    pin = read_pin(project / "patches" / "llama.cpp.pin")
    if source:
        pristine, origin = Path(source).resolve(), f"NAKSHATRA_LLAMA_CPP_DIR={source}"
    elif (project / "llama.cpp" / "CMakeLists.txt").exists():
        pristine, origin = (project / "llama.cpp").resolve(), "checkout llama.cpp/"
    else:
        pristine = fetch_sdist(pin, cache)
        origin = f"{pin['sdist_package']}=={pin['sdist_version']} sdist (commit {pin['commit']})"
    if not (pristine / "include" / "llama.h").exists():
        raise PrepareError(f"{pristine} is not a llama.cpp tree (no include/llama.h)")
    key = hashlib.sha256(str(pristine).encode()).hexdigest()[:12]
    dest = cache / "llama.cpp" / f"src-{key}"
    dest.mkdir(parents=True, exist_ok=True)
    patches = sorted((project / "patches").glob("*.patch"))
    patched = apply_patches(pristine, patches)
    stamp_path = dest / ".nakshatra-patches.json"
    old = json.loads(stamp_path.read_text()) if stamp_path.exists() else {"files": []}
    copied = mirror(pristine, dest, skip=set(patched))
    written = 0
    for rel in sorted(set(old["files"]) | set(patched)):
        if rel in patched:
            written += write_if_changed(dest / rel, patched[rel])
        elif (pristine / rel).exists():
            written += write_if_changed(dest / rel, (pristine / rel).read_bytes())
    info = {
        "origin": origin,
        "commit": pin["commit"] if "sdist" in origin else "unknown",
        "pristine": str(pristine),
        "patches": [p.name for p in patches],
        "patch_sha256": hashlib.sha256(b"".join(p.read_bytes() for p in patches)).hexdigest(),
        "files": sorted(patched),
    }
    stamp_path.write_text(json.dumps(info, indent=1) + "\n")
    log(f"llama.cpp from {origin}; {len(patches)} patches; {copied} files mirrored, "
        f"{written} patched files rewritten -> {dest}")
    return dest, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", required=True, type=Path)
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--source", default=os.environ.get("NAKSHATRA_LLAMA_CPP_DIR") or None)
    args = ap.parse_args()
    try:
        dest, info = prepare(args.project.resolve(), args.cache.resolve(), args.source)
    except PrepareError as e:
        print(f"nakshatra: error: {e}", file=sys.stderr)
        return 1
    print(f"{dest};{info['commit']};{info['patch_sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
