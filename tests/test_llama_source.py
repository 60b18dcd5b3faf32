"""The build's source preparation (cpp/cmake/fetch_llama.py): patches apply with every tool we
support, identically; re-running rewrites nothing; dropping a patch restores the pristine files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nakshatra.paths import cache_dir

ROOT = Path(__file__).resolve().parents[1]
FETCH = ROOT / "cpp" / "cmake" / "fetch_llama.py"


@pytest.fixture(scope="module")
def pristine() -> Path:
    """The pristine llama.cpp tree the installed extension was built from (recorded by the build)."""
    stamps = sorted((cache_dir() / "llama.cpp").glob("src-*/.nakshatra-patches.json"))
    assert stamps, "the extension was built, so the build must have recorded its llama.cpp source"
    return Path(json.loads(stamps[0].read_text())["pristine"])


def prepare(project: Path, cache: Path, source: Path, tool: str) -> Path:
    r = subprocess.run([sys.executable, str(FETCH), "--project", str(project), "--cache", str(cache),
                        "--source", str(source)], capture_output=True, text=True,
                       env={**os.environ, "NAKSHATRA_PATCH_TOOL": tool}, timeout=300)
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip().splitlines()[-1].split(";")[0])


def project_with(patches: list[Path], tmp: Path) -> Path:
    (tmp / "patches").mkdir(parents=True)
    shutil.copy(ROOT / "patches" / "llama.cpp.pin", tmp / "patches")
    for p in patches:
        shutil.copy(p, tmp / "patches")
    return tmp


PATCHED = ["src/llama-model.cpp", "src/llama-graph.cpp", "src/llama-graph.h", "src/models/gemma3.cpp"]


def test_patch_tools_agree_and_reruns_rewrite_nothing(pristine: Path, tmp_path: Path) -> None:
    trees = {}
    for tool in ("git", "patch_ng"):
        dest = prepare(ROOT, tmp_path / tool, pristine, tool)
        trees[tool] = {f: (dest / f).read_bytes() for f in PATCHED}
        assert b"nakshatra" in trees[tool]["src/llama-model.cpp"]
        assert b"llm_graph_partial_out" in trees[tool]["src/llama-graph.cpp"]
        assert b"nak_n_layer_full" in trees[tool]["src/models/gemma3.cpp"]
    assert trees["git"] == trees["patch_ng"]
    dest = prepare(ROOT, tmp_path / "git", pristine, "git")
    mtimes = {f: (dest / f).stat().st_mtime_ns for f in PATCHED}
    prepare(ROOT, tmp_path / "git", pristine, "git")
    assert {f: (dest / f).stat().st_mtime_ns for f in PATCHED} == mtimes


def test_dropping_a_patch_restores_pristine_files(pristine: Path, tmp_path: Path) -> None:
    patches = sorted((ROOT / "patches").glob("*.patch"))
    cache = tmp_path / "cache"
    dest = prepare(ROOT, cache, pristine, "git")
    assert (dest / "src/llama-graph.h").read_bytes() != (pristine / "src/llama-graph.h").read_bytes()
    only_first = project_with(patches[:1], tmp_path / "proj")
    dest2 = prepare(only_first, cache, pristine, "git")
    assert dest2 == dest
    assert (dest / "src/llama-graph.h").read_bytes() == (pristine / "src/llama-graph.h").read_bytes()
    assert b"nakshatra" in (dest / "src/llama-model.cpp").read_bytes()


def test_a_patch_that_does_not_apply_is_a_clear_error(pristine: Path, tmp_path: Path) -> None:
    bad = tmp_path / "0001-bad.patch"
    bad.write_text("--- a/src/llama.cpp\n+++ b/src/llama.cpp\n@@ -1,1 +1,1 @@\n-no such line here\n+x\n")
    project = project_with([bad], tmp_path / "proj")
    r = subprocess.run([sys.executable, str(FETCH), "--project", str(project), "--cache", str(tmp_path / "c"),
                        "--source", str(pristine)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "0001-bad.patch does not apply" in r.stderr and "llama.cpp.pin" in r.stderr
