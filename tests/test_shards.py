"""Models split into shards (llama-gguf-split's NAME-00001-of-0000N.gguf): read as the one model
they are everywhere a model goes in, slices byte-identical to the unsplit model's, and a missing
or foreign shard refused, naming the file, before anything is written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from nakshatra.errors import SliceError
from nakshatra.gguf.inspection import inspect_gguf
from nakshatra.gguf.manifest import sha256_file
from nakshatra.gguf.shards import (
    SPLIT_KEYS,
    model_bytes,
    model_sha256,
    open_model,
    shard_path,
    shard_prefix,
    write_shards,
)
from nakshatra.gguf.slicer import model_layout, scan_gguf, slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.serve import resolve_slice

MODELS = ("smollm2_path", "gemma3_path")


def tiny_writer(path: Path, **split: int) -> GGUFWriter:
    """A small llama model (strings, arrays, F32 and F16 tensors) in a GGUFWriter, not yet written."""
    rng = np.random.default_rng(1)
    w = GGUFWriter(str(path), "llama", **split)
    w.add_uint32("llama.block_count", 3)
    w.add_uint32("llama.embedding_length", 8)
    w.add_array("llama.attention.head_count", [2, 2, 2])
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("token_embd.weight", rng.standard_normal((3, 8), dtype=np.float32))
    for i in range(3):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.standard_normal(5, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rng.standard_normal((16, 8)).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    return w


def write_all(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_writers_split_reads_as_the_model(tmp_path):
    """GGUFWriter's own split (the split keys in another order than llama-gguf-split's) reads as
    the unsplit model, and write_shards cuts the same tensors into files of the same sizes."""
    whole = tmp_path / "whole" / "tiny.gguf"
    whole.parent.mkdir()
    write_all(tiny_writer(whole))
    ref = tmp_path / "ref"
    ref.mkdir()
    write_all(tiny_writer(ref / "tiny.gguf", split_max_tensors=3))
    mine = write_shards(whole, tmp_path / "mine", max_tensors=3)
    names = sorted(p.name for p in ref.iterdir())
    assert names == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)] == [p.name for p in mine]
    for p in mine:
        assert p.stat().st_size == (ref / p.name).stat().st_size, p.name
    for shards in (mine, sorted(ref.iterdir())):
        model = open_model(shards[1])
        assert model.paths == tuple(shards) and model.stem == "tiny" and model.sharded
        assert model_sha256(model) == sha256_file(whole) and model_bytes(model) == whole.stat().st_size
        assert not any(k in model.scan.fields for k in SPLIT_KEYS)


@pytest.fixture(scope="module")
def whole_slices(request, tmp_path_factory) -> dict[str, Path]:
    """Each real model cut in 3 (`--parts 3`) from its unsplit file: fixture name -> directory."""
    out = {}
    for fixture in MODELS:
        out[fixture] = tmp_path_factory.mktemp("whole") / fixture
        slice_model(request.getfixturevalue(fixture), n_parts=3, out_dir=out[fixture], progress=False)
    return out


@pytest.fixture(scope="module")
def llama_gguf_split(upstream_completion, tmp_path_factory) -> Path:
    """Upstream's ``llama-gguf-split``, compiled from the pristine pinned source against the
    oracle build's static libraries (a few seconds), into a temporary directory."""
    b = upstream_completion
    build = b.dir / "build"
    ggml_lib = b.ggml_dir.parent.parent if b.ggml_dir else build / "ggml" / "src"
    libs = [a for a in sorted(build.rglob("*.a")) if "completion" not in a.name] + sorted(ggml_lib.rglob("*.a"))
    out = tmp_path_factory.mktemp("gguf-split") / "llama-gguf-split"
    src = b.pristine
    r = subprocess.run(["g++", "-O1", "-std=c++17", f"-I{src / 'include'}", f"-I{src / 'common'}",
                        f"-I{build / 'common'}", f"-I{src / 'ggml' / 'include'}",
                        str(src / "tools" / "gguf-split" / "gguf-split.cpp"), "-Wl,--start-group",
                        *map(str, libs), "-Wl,--end-group", "-lpthread", "-ldl", "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("limit", [("--split-max-size", "100M"), ("--split-max-tensors", "80")])
def test_write_shards_is_llama_gguf_split(request, llama_gguf_split, whole_slices, tmp_path, fixture, limit):
    """write_shards writes llama-gguf-split's files byte for byte (the issue's 100M cut of
    Gemma 3 270M is three shards, the first without any layer), and upstream's shards slice as
    the unsplit model."""
    whole = request.getfixturevalue(fixture)
    (tmp_path / "up").mkdir()
    subprocess.run([str(llama_gguf_split), "--split", *limit, str(whole), str(tmp_path / "up" / whole.stem)],
                   check=True, capture_output=True, timeout=300)
    kw = {"max_bytes": 100 * 1000 * 1000} if limit[0] == "--split-max-size" else {"max_tensors": 80}
    mine = write_shards(whole, tmp_path / "mine", **kw)
    up = sorted((tmp_path / "up").iterdir())
    assert [p.name for p in mine] == [p.name for p in up]
    for p in mine:
        assert sha256_file(p) == sha256_file(tmp_path / "up" / p.name), p.name
    # and `nak slice FIRST-SHARD --parts 3` on upstream's shards: the unsplit model's slices
    slice_model(up[0], n_parts=3, out_dir=tmp_path / "slices", progress=False)
    assert _files(tmp_path / "slices") == _files(whole_slices[fixture])


def test_shard_names():
    assert shard_path("/m/gemma3", 0, 3) == Path("/m/gemma3-00001-of-00003.gguf")
    assert shard_prefix("/m/gemma3-00002-of-00003.gguf", 1, 3) == Path("/m/gemma3")
    assert shard_prefix("/m/gemma3-00002-of-00003.gguf", 0, 3) is None


def _shard(model: Path, out: Path) -> list[Path]:
    """``model`` in 3 shards named after it, cut every third of its tensors (llama-gguf-split
    --split-max-tensors)."""
    n = len(scan_gguf(model).tensors)
    return write_shards(model, out, max_tensors=math.ceil(n / 3))


@pytest.fixture(scope="module")
def sharded(request, tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    """Both real models, whole and in three shards."""
    out = {}
    for fixture in MODELS:
        whole = request.getfixturevalue(fixture)
        out[fixture] = whole, _shard(whole, tmp_path_factory.mktemp("shards") / fixture)
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("fixture", MODELS)
def test_slices_of_shards_are_the_unsplit_models(sharded, whole_slices, tmp_path, fixture):
    whole, shards = sharded[fixture]
    assert len(shards) == 3
    for shard in shards:  # the shards really split the layers
        assert scan_gguf(shard).tensors
    m = slice_model(shards[1], n_parts=3, out_dir=tmp_path / "shards", progress=False)
    assert m.model["sha256"] == sha256_file(whole) and m.model["bytes"] == whole.stat().st_size
    assert _files(tmp_path / "shards") == _files(whole_slices[fixture])
    assert len(_files(tmp_path / "shards")) == 4  # three slices and the manifest


def test_a_range_across_a_shard_boundary(sharded, tmp_path):
    """Explicit ranges, the middle one holding a layer whose tensors lie in two shards."""
    whole, shards = sharded["smollm2_path"]
    layers = [{int(t.name.split(".")[1]) for t in scan_gguf(s).tensors if t.name.startswith("blk.")}
              for s in shards]
    split = sorted((layers[0] & layers[1]) | (layers[1] & layers[2]))
    assert split  # with this cut, some layer is in two shards
    at = split[0]
    ranges = [LayerRange(0, at - 1), LayerRange(at - 1, at + 2), LayerRange(at + 2, 30)]
    slice_model(whole, ranges=ranges, out_dir=tmp_path / "whole", progress=False)
    slice_model(shards[0], ranges=ranges, out_dir=tmp_path / "shards", progress=False)
    assert _files(tmp_path / "whole") == _files(tmp_path / "shards")


@pytest.mark.parametrize("fixture", MODELS)
def test_layout_and_inspect_of_any_shard(sharded, fixture):
    whole, shards = sharded[fixture]
    want = model_layout(whole)
    for shard in shards:
        got = model_layout(shard)
        assert got == replace(want, path=shards[0])
        info, ref = inspect_gguf(shard), inspect_gguf(whole)
        assert info["shards"] == [str(p) for p in shards] and ref["shards"] is None
        assert {k: v for k, v in info.items() if k not in ("path", "shards")} == \
               {k: v for k, v in ref.items() if k not in ("path", "shards")}
        assert info["weights_bytes"] > 0.9 * whole.stat().st_size


def test_nak_inspect_a_shard(sharded):
    """`nak inspect SHARD`: the same weights and predicted footprint as the whole file (llama.cpp
    loads the split model from shard 1, wherever the one given lies)."""
    whole, shards = sharded["smollm2_path"]

    def inspect(path: Path) -> dict:
        r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "inspect", str(path), "--ctx", "256", "--json"],
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    got, want = inspect(shards[2]), inspect(whole)
    assert got["weights_bytes"] == want["weights_bytes"] > 90 << 20
    for key in ("mapped_weights_bytes", "copied_weights_bytes", "kv_bytes", "compute_bytes", "output_bytes"):
        assert got["footprint"][key] == want["footprint"][key], key
    # llama.cpp's heap figure varies by a few hundred KiB from one load to the next
    assert abs(got["footprint"]["total_bytes"] - want["footprint"]["total_bytes"]) < 2 << 20


def _link_set(shards: list[Path], d: Path, replace_with: dict[int, Path] | None = None) -> list[Path]:
    """Symlinks to ``shards`` in ``d`` (same names), some replaced by other files."""
    d.mkdir()
    out = []
    for i, s in enumerate(shards):
        (d / s.name).symlink_to((replace_with or {}).get(i, s))
        out.append(d / s.name)
    return out


def test_missing_shard_names_it_and_writes_nothing(sharded, tmp_path):
    _, shards = sharded["gemma3_path"]
    links = _link_set(shards, tmp_path / "m")
    links[2].unlink()
    for given in links[:2]:
        with pytest.raises(SliceError, match=f"{links[2]}: no such file, shard 3 of 3"):
            slice_model(given, n_parts=3, out_dir=tmp_path / "out", progress=False)
        with pytest.raises(SliceError, match="no such file"):
            inspect_gguf(given)
    assert not (tmp_path / "out").exists()


def test_foreign_shard_names_it_and_writes_nothing(sharded, tmp_path):
    _, gemma = sharded["gemma3_path"]
    _, smol = sharded["smollm2_path"]
    links = _link_set(gemma, tmp_path / "m", {1: smol[1]})
    with pytest.raises(SliceError, match=f"{links[1]} is not a shard of the model"):
        slice_model(links[0], n_parts=3, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

    # the same model cut in 3 elsewhere: the same split keys, but some tensors in two shards
    other = write_shards(gemma[0], tmp_path / "other", max_tensors=100)
    assert len(other) == 3
    links = _link_set(gemma, tmp_path / "m2", {1: other[1]})
    with pytest.raises(SliceError, match=f"{links[1]} and {links[2]} both hold tensor blk"):
        slice_model(links[0], n_parts=3, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_renamed_or_truncated_shard(sharded, tmp_path):
    _, shards = sharded["smollm2_path"]
    d = tmp_path / "m"
    d.mkdir()
    renamed = d / "model-part2.gguf"
    renamed.symlink_to(shards[1])
    with pytest.raises(SliceError, match=f"{renamed} is shard 2 of 3 .* -00002-of-00003.gguf"):
        open_model(renamed)
    links = _link_set(shards, tmp_path / "t", {2: tmp_path / "short.gguf"})
    (tmp_path / "short.gguf").write_bytes(shards[2].read_bytes()[:-1000])
    with pytest.raises(SliceError, match=f"{links[2]} is not a GGUF file \\(or it is truncated\\)"):
        slice_model(links[0], n_parts=3, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_serve_a_shard_with_layers_is_the_whole_models_cached_slice(sharded, tmp_path, monkeypatch):
    """`nak serve SHARD --layers 3-5` loads the slice `nak serve MODEL --layers 3-5` loads: the
    cache is keyed by the model's identity, and the split model's is the unsplit file's sha256.
    The shards are found by their names through symlinks (a Hugging Face cache)."""
    monkeypatch.setenv("NAKSHATRA_CACHE_DIR", str(tmp_path / "cache"))
    whole, shards = sharded["smollm2_path"]
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for i, s in enumerate(shards):  # snapshot names -> blobs named by hash, as huggingface_hub does
        (blobs / f"blob{i}").symlink_to(s)
    links = _link_set(shards, tmp_path / "snapshot", {i: blobs / f"blob{i}" for i in range(3)})
    sha = sha256_file(whole)
    path, got_sha = resolve_slice(links[1], "3-5")
    assert got_sha == sha
    assert path == tmp_path / "cache" / "slices" / sha[:16] / "smollm2.3-5.gguf"
    stamp = path.stat().st_mtime_ns
    assert resolve_slice(whole, "3-5") == (path, sha)
    assert path.stat().st_mtime_ns == stamp  # the same cached file, not cut again
    index = json.loads((tmp_path / "cache" / "slices" / "index.json").read_text())
    assert index[str(links[0])] == {"shards": [[s.stat().st_size, s.stat().st_mtime_ns] for s in links],
                                    "sha256": sha}
    assert resolve_slice(links[2], None) == (links[0], sha)  # served whole from shard 1


def test_run_from_shards_answers_as_the_whole_model(sharded, tmp_path):
    """`nak run --model SHARD --parts 2`: the same answer as from the whole file (one short run
    each)."""
    whole, shards = sharded["smollm2_path"]

    def run(model: Path) -> str:
        r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "run", "--model", str(model), "--parts", "2",
                            "--temp", "0", "-n", "8", "--threads", "2", "--ctx", "256", "What is 2+2?"],
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                           env={**os.environ, "NAKSHATRA_CACHE_DIR": str(tmp_path / "cache")})
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert run(shards[0]) == run(whole) != ""


def test_plan_memory_from_a_shard(sharded, tmp_path, monkeypatch):
    """`nak plan SHARD`: the memory model of the split model is the unsplit file's (its fixed
    costs up to llama.cpp's heap noise, see test_nak_inspect_a_shard)."""
    from nakshatra.cluster.plan import model_memory

    monkeypatch.setenv("NAKSHATRA_CACHE_DIR", str(tmp_path / "cache"))
    whole, shards = sharded["smollm2_path"]
    got, want = model_memory(shards[1], ctx=256, max_sessions=1), model_memory(whole, ctx=256, max_sessions=1)
    assert replace(got, fixed=0) == replace(want, fixed=0)
    assert all(abs(a - b) < 2 << 20 for a, b in zip(got.fixed, want.fixed)), (got.fixed, want.fixed)


@pytest.mark.parametrize("command", [
    ("slice", "{shard}", "--parts", "3", "-o", "{out}"),
    ("inspect", "{shard}"),
    ("run", "--model", "{shard}", "--parts", "2", "-n", "4", "hi"),
    ("serve", "{shard}", "--layers", "3-5", "--port", "0"),
    ("plan", "{shard}", "--host", "a=127.0.0.1,mem=4G,speed=100"),
])
def test_every_command_names_a_missing_shard_in_one_line(sharded, tmp_path, command):
    _, shards = sharded["smollm2_path"]
    links = _link_set(shards, tmp_path / "m")
    links[1].unlink()
    args = [a.format(shard=links[2], out=tmp_path / "out") for a in command]
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", *args], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "400",
                                                      "NAKSHATRA_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {links[1]}: no such file, shard 2 of 3 of smollm2; put all 3 "
                                             f"shards in {links[1].parent}"], r.stderr
    assert r.stdout == "" and not (tmp_path / "out").exists()


def test_serve_a_split_model_whole(sharded, tmp_path):
    """`nak serve SHARD` (no --layers) serves the split model whole, loaded from shard 1: the
    tokens of the unsplit model."""
    from nakshatra import _nakshatra
    from nakshatra.client.chain import Chain, SamplerParams

    whole, shards = sharded["smollm2_path"]
    p = subprocess.Popen([sys.executable, "-m", "nakshatra_cli", "serve", str(shards[2]), "--port", "0",
                          "--ready-json", "--threads", "2", "--ctx", "256", "--max-sessions", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        line = p.stdout.readline()
        assert line, p.stderr.read()
        with Chain([f"127.0.0.1:{json.loads(line)['port']}"]) as c:
            prompt = c.tokenize("The capital of France is")
            got = [t for t, _ in c.generate_tokens(prompt, 8, SamplerParams(temp=0))]
    finally:
        p.terminate()
        p.communicate(timeout=30)
    assert got == _nakshatra.Reference(str(whole), n_ctx=256).generate(prompt, 8, temp=0.0)


def test_a_sparse_copy_with_only_the_bytes_a_slice_reads(sharded, tmp_path, monkeypatch):
    """What remote fetching builds: local files of the shards' names and sizes holding only the
    bytes slice_byte_ranges lists (holes elsewhere); given the model's identity, the slice cut
    from them is the one the whole model gives."""
    from nakshatra.gguf.slicer import cached_slice, slice_byte_ranges

    whole, shards = sharded["gemma3_path"]
    rng = LayerRange(4, 8)  # layer 5 lies in shards 1 and 2
    spans = slice_byte_ranges(shards[1], [rng])
    assert [p.name for p in spans] == [s.name for s in shards] and spans[shards[0]][0][0] == 0
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    for src, parts in spans.items():
        with open(src, "rb") as f, open(sparse / src.name, "wb") as out:
            out.truncate(src.stat().st_size)
            for offset, n in parts:
                f.seek(offset)
                out.seek(offset)
                out.write(f.read(n))
    read = sum(n for parts in spans.values() for _, n in parts)
    assert read < 0.5 * whole.stat().st_size
    monkeypatch.setenv("NAKSHATRA_CACHE_DIR", str(tmp_path / "a"))
    want = cached_slice(whole, rng, 18, progress=False).read_bytes()
    monkeypatch.setenv("NAKSHATRA_CACHE_DIR", str(tmp_path / "b"))
    got = cached_slice(sparse / shards[2].name, rng, 18, progress=False, sha256=sha256_file(whole))
    assert got.read_bytes() == want
