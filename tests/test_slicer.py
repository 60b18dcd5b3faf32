"""Slicing real models (SmolLM2, Gemma 3) and tiny hand-made GGUFs; every check reads the written
files back with gguf's reader."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter

from nakshatra.errors import RangeError, SliceError
from nakshatra.gguf.inspection import inspect_gguf, render_inspection
from nakshatra.gguf.manifest import Manifest, sha256_file
from nakshatra.gguf.scan import WINDOW
from nakshatra.gguf.slicer import (
    NAK_KEYS,
    cached_slice,
    kv_value,
    model_layout,
    read_slice_meta,
    scan_gguf,
    slice_model,
    swa_pattern,
    verify_slice,
)
from nakshatra.ranges import LayerRange, parse_ranges, plan_parts


def summarize(path: Path) -> dict:
    """Everything a test compares, without keeping the reader: raw encoded bytes of each KV
    (hashed), decoded values of the non-tokenizer KVs and field types, each tensor's type, shape
    and data hash."""
    r = GGUFReader(path)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return {
        "raw": {k: hashlib.sha256(r.data[f.offset:f.offset + sum(int(p.nbytes) for p in f.parts)]).hexdigest()
                for k, f in fields.items()},
        "kv": {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.")},
        "types": {k: [GGUFValueType(t) for t in f.types] for k, f in fields.items()},
        "keys": list(fields),
        "tensors": {t.name: (t.tensor_type, tuple(int(x) for x in t.shape), int(t.n_bytes),
                             hashlib.sha256(t.data).hexdigest()) for t in r.tensors},
        "tensor_order": [t.name for t in r.tensors],
    }


def gemma_swa(il: int) -> bool:
    """Gemma 3's global layout: every 6th layer (5, 11, 17, ...) uses full attention."""
    return (il + 1) % 6 != 0


CASES = {
    "smollm2-parts3": ("smollm2_path", {"n_parts": 3}),
    "smollm2-uneven": ("smollm2_path", {"ranges": "0-3,4-20,21-29"}),
    "gemma3-parts3": ("gemma3_path", {"n_parts": 3}),
    "gemma3-uneven": ("gemma3_path", {"ranges": "0-6,7-12,13-17"}),
}


@pytest.fixture(scope="module")
def originals(request):
    cache = {}

    def get(fixture: str) -> tuple[dict, object]:
        if fixture not in cache:
            path = request.getfixturevalue(fixture)
            cache[fixture] = summarize(path), model_layout(path)
        return cache[fixture]
    return get


@pytest.fixture(scope="module", params=list(CASES))
def sliced(request, tmp_path_factory, originals):
    fixture, how = CASES[request.param]
    model = request.getfixturevalue(fixture)
    orig, layout = originals(fixture)
    out = tmp_path_factory.mktemp(request.param)
    ranges = parse_ranges(how["ranges"], layout.n_layer) if "ranges" in how else None
    manifest = slice_model(model, ranges=ranges, n_parts=how.get("n_parts"), out_dir=out,
                           progress=False)
    want = ranges or plan_parts(layout.layer_bytes, how["n_parts"], layout.first_extra, layout.last_extra)
    return {"model": model, "layout": layout, "out": out, "manifest": manifest, "want": want,
            "n_parts": how.get("n_parts"), "orig": orig, "slices": [summarize(out / s.file) for s in manifest.slices]}


def expected_names(orig: dict, rng: LayerRange, n_layer: int) -> dict[str, str]:
    """Slice tensor name -> original tensor name, by the placement rules."""
    names = {}
    tied = "output.weight" not in orig["tensors"]
    for name in orig["tensors"]:
        if name.startswith("blk."):
            il = int(name.split(".")[1])
            if rng.start <= il < rng.end:
                names[f"blk.{il - rng.start}." + name.split(".", 2)[2]] = name
        elif name.startswith(("token_embd.", "token_types.", "pos_embd.")):
            if rng.start == 0 or (tied and rng.end == n_layer and name == "token_embd.weight"):
                names[name] = name
        elif name.startswith(("output_norm.", "output.")):
            if rng.end == n_layer:
                names[name] = name
        else:
            names[name] = name
    return names


def test_ranges_as_asked(sliced):
    layout = sliced["layout"]
    assert sliced["manifest"].ranges == sliced["want"]
    if sliced["n_parts"]:
        assert sliced["want"] == plan_parts(layout.layer_bytes, 3, layout.first_extra, layout.last_extra)


def test_tensors_are_the_original_bytes(sliced):
    orig, n_layer = sliced["orig"], sliced["layout"].n_layer
    for info, sl in zip(sliced["manifest"].slices, sliced["slices"]):
        want = expected_names(orig, info.range, n_layer)
        assert set(sl["tensors"]) == set(want)
        for new, old in want.items():
            assert sl["tensors"][new] == orig["tensors"][old], new
        # file order follows the original's order
        assert [want[n] for n in sl["tensor_order"]] == [n for n in orig["tensor_order"] if n in want.values()]


def test_tied_embedding_placement(sliced):
    first, *middle, last = sliced["slices"]
    assert "output.weight" not in sliced["orig"]["tensors"]  # both models tie the LM head
    assert "token_embd.weight" in first["tensors"] and "token_embd.weight" in last["tensors"]
    assert "output_norm.weight" in last["tensors"] and "output_norm.weight" not in first["tensors"]
    for sl in middle:
        assert not any(n.startswith(("token_embd", "output")) for n in sl["tensors"])


def test_metadata(sliced):
    orig, layout, m = sliced["orig"], sliced["layout"], sliced["manifest"]
    arch = layout.arch
    changed = {f"{arch}.block_count", f"{arch}.attention.sliding_window_pattern",
               f"{arch}.attention.sliding_window"}
    for i, (info, sl) in enumerate(zip(m.slices, sliced["slices"])):
        rng = info.range
        for key in orig["raw"]:  # every original key, tokenizer included, byte for byte
            if key not in changed:
                assert sl["raw"][key] == orig["raw"][key], key
        assert sl["keys"][:len(orig["keys"])] == orig["keys"]  # original order kept
        assert sl["kv"][f"{arch}.block_count"] == rng.n_layers
        assert sl["kv"]["nakshatra.layer_range_start"] == rng.start
        assert sl["kv"]["nakshatra.layer_range_end"] == rng.end
        assert sl["kv"]["nakshatra.n_layer_full"] == layout.n_layer
        assert sl["kv"]["nakshatra.slice_index"] == i
        assert sl["kv"]["nakshatra.slice_count"] == len(m.slices)
        assert sl["kv"]["nakshatra.model_sha256"] == layout.sha256
        assert sl["kv"]["nakshatra.tensor_data_sha256"] == info.tensor_data_sha256
        for key in NAK_KEYS[:5]:
            assert sl["types"][key] == [GGUFValueType.UINT32]


def test_gemma3_explicit_sliding_window_pattern(sliced):
    if sliced["layout"].arch != "gemma3":  # no sliding window: no pattern is invented
        assert not any("sliding_window" in k for s in sliced["slices"] for k in s["kv"])
        return
    assert "gemma3.attention.sliding_window_pattern" not in sliced["orig"]["kv"]
    for info, sl in zip(sliced["manifest"].slices, sliced["slices"]):
        pattern = sl["kv"]["gemma3.attention.sliding_window_pattern"]
        assert sl["types"]["gemma3.attention.sliding_window_pattern"] == [GGUFValueType.ARRAY, GGUFValueType.BOOL]
        assert pattern == [gemma_swa(il) for il in range(info.layer_start, info.layer_end)]
        # a slice of only full-attention layers declares no window (llama.cpp needs one SWA layer)
        window = sl["kv"]["gemma3.attention.sliding_window"]
        assert window == (sliced["orig"]["kv"]["gemma3.attention.sliding_window"] if any(pattern) else 0)


def test_manifest(sliced):
    m, out, layout = sliced["manifest"], sliced["out"], sliced["layout"]
    stem = Path(sliced["model"]).stem
    assert Manifest.load(out / f"{stem}.manifest.json") == m
    assert m.format_version == 1
    assert m.model == {"name": stem, "arch": layout.arch, "n_embd": layout.n_embd,
                       "n_layer": layout.n_layer, "sha256": sha256_file(sliced["model"]),
                       "bytes": os.path.getsize(sliced["model"])}
    for info in m.slices:
        path = out / info.file
        assert info.file == f"{stem}.{info.layer_start}-{info.layer_end - 1}.gguf"
        assert info.bytes == path.stat().st_size
        assert info.sha256 == sha256_file(path)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s.file for s in m.slices] + [f"{stem}.manifest.json"])  # no temp files


def test_verify_slice_detects_a_flipped_byte(smollm2_path, tmp_out):
    m = slice_model(smollm2_path, ranges=parse_ranges("0-14,15-29", 30), out_dir=tmp_out, progress=False)
    path = tmp_out / m.slices[1].file
    assert verify_slice(path) is True
    r = GGUFReader(path)
    offset = int(r.tensors[len(r.tensors) // 2].data_offset) + 7
    del r
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(SliceError, match="re-run nak slice") as e:
        verify_slice(path)
    assert str(path) in str(e.value)
    with pytest.raises(SliceError, match="not a Nakshatra slice"):
        verify_slice(smollm2_path)


def test_read_slice_meta_of_whole_model(smollm2_path):
    assert read_slice_meta(smollm2_path) == {k: None for k in NAK_KEYS}


def test_model_layout(smollm2_path):
    layout = model_layout(smollm2_path)
    r = GGUFReader(smollm2_path)
    total = sum(int(t.n_bytes) for t in r.tensors)
    assert (layout.arch, layout.n_layer, layout.n_embd, layout.tied) == ("llama", 30, 576, True)
    assert sum(layout.layer_bytes) + layout.input_bytes + layout.output_bytes + layout.global_bytes == total
    assert layout.token_embd_bytes == layout.input_bytes
    assert layout.last_extra == layout.output_bytes + layout.token_embd_bytes
    assert len(set(layout.layer_bytes)) == 1 and layout.global_tensors == []
    assert layout.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_inspect(smollm2_path, tmp_out):
    whole = inspect_gguf(smollm2_path, n_ctx=1000)
    assert (whole["kind"], whole["n_layer"], whole["n_head"], whole["n_head_kv"]) == ("model", 30, 9, 3)
    # head_dim 576/9 = 64; 3 kv heads; k and v; f16; llama.cpp pads 1000 cells to 1024
    assert whole["kv_bytes"] == 1024 * 30 * (64 * 3 * 2) * 2
    assert whole["total_bytes"] == whole["weights_bytes"] + whole["kv_bytes"]
    m = slice_model(smollm2_path, ranges=parse_ranges("0-9,10-29", 30), out_dir=tmp_out, progress=False)
    part = inspect_gguf(tmp_out / m.slices[1].file, n_ctx=1000)
    assert (part["kind"], part["range"], part["slice_index"], part["slice_count"]) == (
        "slice", LayerRange(10, 30), 1, 2)
    assert part["kv_bytes"] == whole["kv_bytes"] * 20 // 30
    assert part["tensors"]["input"]["count"] == 0
    assert part["tensors"]["output"]["count"] == 2  # output_norm and the tied token_embd
    assert render_inspection(part).row_count > 5


# --- tiny hand-made models: per-layer arrays, untied head, global tensors, sliding window ----

def write_tiny(path: Path, arch: str = "llama", n_layer: int = 4, tied: bool = False,
               kv: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_uint32(f"{arch}.embedding_length", 8)
    w.add_array(f"{arch}.attention.head_count", [4 - i % 2 for i in range(n_layer)])
    w.add_array(f"{arch}.feed_forward_length", [8 * (i + 1) for i in range(n_layer)])
    w.add_uint32(f"{arch}.attention.head_count_kv", 1)
    w.add_array(f"{arch}.rope.dimension_sections", [1, 2, 3])  # not per-layer: kept whole
    w.add_array("general.tags", [f"t{i}" for i in range(n_layer)])  # not under <arch>.: kept whole
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    for key, (value, vtype, sub) in (kv or {}).items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.add_tensor("token_embd.weight", rng.standard_normal((3, 8), dtype=np.float32))
    w.add_tensor("rope_freqs.weight", np.ones(4, dtype=np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.standard_normal(8, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rng.standard_normal((16, 8)).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", rng.standard_normal((3, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_untied_per_layer_arrays_and_globals(tmp_path, tmp_out, capsys):
    model = write_tiny(tmp_path / "tiny.gguf")
    m = slice_model(model, ranges=parse_ranges("0-0,1-2,3-3", 4), out_dir=tmp_out, progress=True)
    assert "tiny.3-3.gguf" in capsys.readouterr().err  # the progress bar, on stderr
    orig = summarize(model)
    s0, s1, s2 = (summarize(tmp_out / s.file) for s in m.slices)
    assert [s["kv"]["llama.attention.head_count"] for s in (s0, s1, s2)] == [[4], [3, 4], [3]]
    assert [s["kv"]["llama.feed_forward_length"] for s in (s0, s1, s2)] == [[8], [16, 24], [32]]
    for s in (s0, s1, s2):
        assert s["kv"]["llama.rope.dimension_sections"] == [1, 2, 3]
        assert s["kv"]["general.tags"] == ["t0", "t1", "t2", "t3"]
        assert s["tensors"]["rope_freqs.weight"] == orig["tensors"]["rope_freqs.weight"]
    assert set(s0["tensors"]) == {"token_embd.weight", "rope_freqs.weight", "blk.0.attn_norm.weight",
                                  "blk.0.ffn_up.weight"}
    assert set(s1["tensors"]) == {"rope_freqs.weight", "blk.0.attn_norm.weight", "blk.0.ffn_up.weight",
                                  "blk.1.attn_norm.weight", "blk.1.ffn_up.weight"}
    assert s1["tensors"]["blk.1.ffn_up.weight"] == orig["tensors"]["blk.2.ffn_up.weight"]
    # untied: the LM head is output.weight, and token_embd stays on the first stage only
    assert set(s2["tensors"]) == {"rope_freqs.weight", "blk.0.attn_norm.weight", "blk.0.ffn_up.weight",
                                  "output_norm.weight", "output.weight"}
    layout = model_layout(model)
    assert not layout.tied and layout.global_tensors == ["rope_freqs.weight"]
    assert layout.last_extra == layout.output_bytes and layout.first_extra == layout.input_bytes


U32, ARR = GGUFValueType.UINT32, GGUFValueType.ARRAY


@pytest.mark.parametrize("pattern_kv,flags", [
    ({}, [True] * 5 + [False, True]),  # gemma3's default period 6
    ({"gemma3.attention.sliding_window_pattern": (3, U32, None)}, [True, True, False] * 2 + [True]),
    ({"gemma3.attention.sliding_window_pattern": (0, U32, None)}, [True] * 7),
    ({"gemma3.attention.sliding_window_pattern": ([0, 1, 1, 0, 0, 1, 0], ARR, GGUFValueType.INT32)},
     [False, True, True, False, False, True, False]),
])
def test_tiny_sliding_window_pattern(tmp_path, tmp_out, pattern_kv, flags):
    kv = {"gemma3.attention.sliding_window": (8, U32, None), **pattern_kv}
    model = write_tiny(tmp_path / "g.gguf", arch="gemma3", n_layer=7, tied=True, kv=kv)
    m = slice_model(model, ranges=parse_ranges("0-1,2-2,3-6", 7), out_dir=tmp_out, progress=False)
    for info in m.slices:
        s = summarize(tmp_out / info.file)
        want = flags[info.layer_start:info.layer_end]
        assert s["kv"]["gemma3.attention.sliding_window_pattern"] == want
        assert s["types"]["gemma3.attention.sliding_window_pattern"] == [ARR, GGUFValueType.BOOL]
        assert s["kv"]["gemma3.attention.sliding_window"] == (8 if any(want) else 0)


@pytest.mark.parametrize("arch, flags", [
    ("gemma2", [True, False] * 4),                 # load_swa_pattern(ml, 2): the full layer last
    ("cohere2moe", [False, True, True, True] * 2),  # load_swa_pattern(ml, 4, true): the full layer first
    ("llama", None),                               # reads no pattern
])
def test_default_sliding_window_period_comes_from_the_loader(tmp_path, arch, flags):
    kv = {f"{arch}.attention.sliding_window": (8, U32, None)}
    reader = GGUFReader(write_tiny(tmp_path / "m.gguf", arch=arch, n_layer=8, kv=kv))
    assert swa_pattern(reader, arch, 8) == flags


def test_a_slice_without_a_sliding_layer_is_refused_where_llama_cpp_needs_one(tmp_path, tmp_out):
    # gemma2's graph builds only a sliding-window cache, which asserts a sliding layer; layer 1
    # of a period-2 model is full attention
    kv = {"gemma2.attention.sliding_window": (8, U32, None)}
    model = write_tiny(tmp_path / "g.gguf", arch="gemma2", n_layer=4, tied=True, kv=kv)
    with pytest.raises(SliceError,
                       match=r"layers 1-1 of this gemma2 model are all full-attention layers.*move the cut"):
        slice_model(model, ranges=parse_ranges("0-0,1-1,2-3", 4), out_dir=tmp_out, progress=False)
    assert not any(tmp_out.iterdir())  # refused before anything was written
    slice_model(model, ranges=parse_ranges("0-1,2-3", 4), out_dir=tmp_out, progress=False)


def test_leading_dense_layers_and_next_n_blocks(tmp_path, tmp_out):
    # 4 decoder layers, the first 2 dense, then 1 multi-token-prediction (next-n) block: blk.4
    kv = {"deepseek2.leading_dense_block_count": (2, U32, None), "deepseek2.nextn_predict_layers": (1, U32, None)}
    model = write_tiny(tmp_path / "ds.gguf", arch="deepseek2", n_layer=5, kv=kv)
    layout = model_layout(model)
    assert (layout.n_layer, layout.n_nextn) == (4, 1)
    m = slice_model(model, ranges=parse_ranges("0-0,1-2,3-3", 4), out_dir=tmp_out, progress=False)
    s = [summarize(tmp_out / info.file) for info in m.slices]
    # llama.cpp tests `il < n_layer_dense_lead` with a slice's local il: rebased per slice
    assert [x["kv"]["deepseek2.leading_dense_block_count"] for x in s] == [2, 1, 0]
    assert [x["kv"]["deepseek2.nextn_predict_layers"] for x in s] == [0, 0, 0]
    assert [x["kv"]["deepseek2.block_count"] for x in s] == [1, 2, 1]
    assert [x["kv"]["nakshatra.n_layer_full"] for x in s] == [4, 4, 4]
    # per-layer arrays (one entry per block, the next-n block included) are cut to the range
    assert [x["kv"]["deepseek2.feed_forward_length"] for x in s] == [[8], [16, 24], [32]]
    # the next-n block is in no slice
    names = [n for x in s for n in x["tensors"]]
    assert not any(n.startswith("blk.") and int(n.split(".")[1]) >= 2 for n in names)
    assert sum(n.endswith("attn_norm.weight") for n in names) == 4


def test_no_window_no_pattern(tmp_path, tmp_out):
    model = write_tiny(tmp_path / "g.gguf", arch="gemma3", n_layer=3, tied=True)
    m = slice_model(model, n_parts=2, out_dir=tmp_out, progress=False)
    for info in m.slices:
        assert "gemma3.attention.sliding_window_pattern" not in summarize(tmp_out / info.file)["kv"]


# --- errors ------------------------------------------------------------------------------------

def test_not_a_gguf(tmp_path, tmp_out):
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("hello, I am text\n" * 10)
    with pytest.raises(SliceError, match="is not a GGUF") as e:
        slice_model(bogus, n_parts=2, out_dir=tmp_out, progress=False)
    assert str(bogus) in str(e.value)
    with pytest.raises(SliceError, match="no such model file"):
        slice_model(tmp_path / "missing.gguf", n_parts=2, out_dir=tmp_out, progress=False)
    assert not tmp_out.exists()


def test_unsupported_arch(tmp_path, tmp_out):
    model = write_tiny(tmp_path / "m.gguf", arch="mamba")
    with pytest.raises(SliceError, match="'mamba' cannot be split by layer ranges: mamba keeps recurrent state per sequence") as e:
        slice_model(model, n_parts=2, out_dir=tmp_out, progress=False)
    assert str(model) in str(e.value)
    assert not tmp_out.exists()


@pytest.mark.parametrize("ranges,needle", [
    ([LayerRange(0, 1), LayerRange(2, 4)], "layer 1 is in no range"),
    ([LayerRange(0, 2), LayerRange(1, 4)], "overlap"),
    ([LayerRange(0, 2), LayerRange(2, 5)], "beyond the model"),
    ([LayerRange(1, 4)], "layer 0 is in no range"),
])
def test_bad_ranges(tmp_path, tmp_out, ranges, needle):
    model = write_tiny(tmp_path / "tiny.gguf")
    with pytest.raises(RangeError, match=needle):
        slice_model(model, ranges=ranges, out_dir=tmp_out, progress=False)
    with pytest.raises(RangeError, match="exactly one"):
        slice_model(model, ranges=[LayerRange(0, 4)], n_parts=1, out_dir=tmp_out, progress=False)
    with pytest.raises(RangeError, match="cannot split 4 layers into 5"):
        slice_model(model, n_parts=5, out_dir=tmp_out, progress=False)


def test_already_a_slice(tmp_path, tmp_out):
    model = write_tiny(tmp_path / "tiny.gguf")
    m = slice_model(model, n_parts=2, out_dir=tmp_out, progress=False)
    with pytest.raises(SliceError, match="already a slice"):
        slice_model(tmp_out / m.slices[0].file, n_parts=1, out_dir=tmp_path / "again", progress=False)


def test_output_dir_not_creatable(tmp_path):
    model = write_tiny(tmp_path / "tiny.gguf")
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        with pytest.raises(SliceError, match="cannot create output directory") as e:
            slice_model(model, n_parts=2, out_dir=out, progress=False)
        assert str(out) in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_output_dir_not_writable(tmp_path, tmp_out):
    model = write_tiny(tmp_path / "tiny.gguf")
    tmp_out.mkdir()
    tmp_out.chmod(0o500)
    try:
        with pytest.raises(SliceError, match="not writable"):
            slice_model(model, n_parts=2, out_dir=tmp_out, progress=False)
    finally:
        tmp_out.chmod(0o700)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_leaves_no_temp_file(tmp_path, tmp_out):
    """The second slice's temp file is a link to /dev/full, where every write fails with ENOSPC."""
    model = write_tiny(tmp_path / "tiny.gguf")
    tmp_out.mkdir()
    (tmp_out / "tiny.2-3.gguf.tmp").symlink_to("/dev/full")
    with pytest.raises(SliceError, match="disk full writing") as e:
        slice_model(model, ranges=parse_ranges("0-1,2-3", 4), out_dir=tmp_out, progress=False)
    assert str(tmp_out / "tiny.2-3.gguf") in str(e.value) and "free" in str(e.value)
    left = sorted(p.name for p in tmp_out.iterdir())
    assert left == ["tiny.0-1.gguf"]  # the finished slice; no temp file, no half slice, no manifest
    verify_slice(tmp_out / "tiny.0-1.gguf")


# --- cached on-the-fly cut ---------------------------------------------------------------------

def test_cached_slice(tmp_path, monkeypatch):
    monkeypatch.setenv("NAKSHATRA_CACHE_DIR", str(tmp_path / "cache"))
    model = write_tiny(tmp_path / "tiny.gguf")
    path = cached_slice(model, LayerRange(1, 3), 4, progress=False)
    sha = sha256_file(model)
    assert path == tmp_path / "cache" / "slices" / sha[:16] / "tiny.1-2.gguf"
    meta = read_slice_meta(path)
    assert (meta["nakshatra.layer_range_start"], meta["nakshatra.layer_range_end"]) == (1, 3)
    assert (meta["nakshatra.slice_index"], meta["nakshatra.slice_count"]) == (0, 0)
    assert meta["nakshatra.model_sha256"] == sha
    assert meta == {k: v for k, v in summarize(path)["kv"].items() if k.startswith("nakshatra.")}
    index = json.loads((tmp_path / "cache" / "slices" / "index.json").read_text())
    assert index[str(model.resolve())]["sha256"] == sha

    stamp = path.stat().st_mtime_ns
    assert cached_slice(model, LayerRange(1, 3), 4, progress=False) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not cut again

    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # corrupt the last tensor's data: it is cut again
    path.write_bytes(bytes(data))
    assert cached_slice(model, LayerRange(1, 3), 4, progress=False) == path
    assert verify_slice(path)

    with pytest.raises(RangeError, match="beyond the model"):
        cached_slice(model, LayerRange(2, 5), 4, progress=False)
    with pytest.raises(RangeError, match="has 4 layers, not 6"):
        cached_slice(model, LayerRange(0, 2), 6, progress=False)
    assert not list((tmp_path / "cache" / "slices").rglob("*.tmp"))


# --- manifest ----------------------------------------------------------------------------------

def test_manifest_validation(tmp_path):
    good = {"format_version": 1,
            "model": {"name": "m", "arch": "llama", "n_embd": 8, "n_layer": 4, "sha256": "ab", "bytes": 9},
            "slices": [{"file": "m.0-1.gguf", "layer_start": 0, "layer_end": 2, "bytes": 1, "sha256": "x",
                        "tensor_data_sha256": "y"},
                       {"file": "m.2-3.gguf", "layer_start": 2, "layer_end": 4, "bytes": 1, "sha256": "x",
                        "tensor_data_sha256": "y"}]}
    path = tmp_path / "m.manifest.json"
    path.write_text(json.dumps(good))
    m = Manifest.load(path)
    assert m.ranges == [LayerRange(0, 2), LayerRange(2, 4)]
    m.save(tmp_path / "copy.json")
    assert Manifest.load(tmp_path / "copy.json") == m

    def broken(mutate) -> str:
        data = json.loads(json.dumps(good))
        mutate(data)
        path.write_text(json.dumps(data))
        with pytest.raises(SliceError) as e:
            Manifest.load(path)
        return str(e.value)

    assert "format_version" in broken(lambda d: d.update(format_version=2))
    assert "model.n_layer" in broken(lambda d: d["model"].pop("n_layer"))
    assert "slices[1].layer_end" in broken(lambda d: d["slices"][1].update(layer_end="4"))
    assert "next slice should start at layer 2" in broken(lambda d: d["slices"][1].update(layer_start=3))
    assert "the model has 5" in broken(lambda d: d["model"].update(n_layer=5))
    assert "non-empty list" in broken(lambda d: d.update(slices=[]))
    path.write_text("{not json")
    with pytest.raises(SliceError, match="not valid JSON"):
        Manifest.load(path)
    with pytest.raises(SliceError, match="cannot read manifest"):
        Manifest.load(tmp_path / "absent.json")


def test_slices_land_in_cwd_by_default(tmp_path, monkeypatch):
    model = write_tiny(tmp_path / "tiny.gguf")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    m = slice_model(model, n_parts=2, progress=False)
    assert sorted(p.name for p in work.iterdir()) == sorted([s.file for s in m.slices] + ["tiny.manifest.json"])
    shutil.rmtree(work)


# --- the writer's bytes are GGUFWriter's ----------------------------------------------------------
#
# The slicer scans the original with nakshatra.gguf.scan and copies metadata record by record. Its
# files must be byte for byte what the slicer wrote when it read the model with GGUFReader and wrote
# each slice with GGUFWriter; reference_slice below is that earlier writer.

STR, BOOL, F32 = GGUFValueType.STRING, GGUFValueType.BOOL, GGUFValueType.FLOAT32


def reference_metadata(reader) -> dict:
    """Every key's value as GGUFReader reads it (strings as raw bytes), for GGUFWriter."""
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        t = f.types[0]
        if t == ARR:
            assert len(f.types) == 2 and f.types[1] != ARR
            meta[key] = ([bytes(f.parts[i]) for i in f.data] if f.types[1] == STR else f.contents(), t, f.types[1])
        else:
            meta[key] = (bytes(f.parts[-1]) if t == STR else f.contents(), t, None)
    return meta


def reference_slice(reader, base: dict, layout, info, index: int, count: int, path: Path) -> bytes:
    """Slice ``info.range`` of the model read by ``reader`` (GGUFReader; ``base``: its
    :func:`reference_metadata`) as a GGUFReader-values -> GGUFWriter rewrite: every original key in
    order (per-layer arrays cut, block_count, sliding window), then the nakshatra keys; the selected
    tensors' infos and data, padded."""
    arch, n, rng = layout.arch, layout.n_layer, info.range
    meta = {}
    for key, (value, t, sub) in base.items():
        if t == ARR and key.startswith(arch + ".") and len(value) == n:
            value = value[rng.start:rng.end]
        meta[key] = (value, t, sub)
    meta[f"{arch}.block_count"] = (rng.n_layers, meta[f"{arch}.block_count"][1], None)
    swa = swa_pattern(reader, arch, n)
    if swa is not None:
        flags = swa[rng.start:rng.end]
        meta[f"{arch}.attention.sliding_window_pattern"] = (flags, ARR, BOOL)
        if not any(flags):
            meta[f"{arch}.attention.sliding_window"] = (0, meta[f"{arch}.attention.sliding_window"][1], None)
    for k, v in zip(NAK_KEYS, (rng.start, rng.end, n, index, count)):
        meta[k] = (v, U32, None)
    meta["nakshatra.model_sha256"] = (layout.sha256, STR, None)
    meta["nakshatra.tensor_data_sha256"] = (info.tensor_data_sha256, STR, None)

    tensors = []
    for t in reader.tensors:
        if t.name.startswith("blk."):
            il = int(t.name.split(".")[1])
            if rng.start <= il < rng.end:
                tensors.append((f"blk.{il - rng.start}." + t.name.split(".", 2)[2], t))
        elif t.name.startswith(("token_embd.", "token_types.", "pos_embd.")):
            if rng.start == 0 or (rng.end == n and layout.tied and t.name == "token_embd.weight"):
                tensors.append((t.name, t))
        elif not t.name.startswith(("output_norm.", "output.")) or rng.end == n:
            tensors.append((t.name, t))

    w = GGUFWriter(None, arch)
    w.kv_data[0].clear()
    for key, (value, vtype, sub) in meta.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.data_alignment = reader.alignment
    for name, t in tensors:
        w.add_tensor_info(name, t.data.shape, t.data.dtype, int(t.n_bytes), raw_dtype=t.tensor_type)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    for _, t in tensors:
        w.write_padding(fout, fout.tell())
        fout.write(bytes(reader.data[t.data_offset:t.data_offset + t.n_bytes]))
        w.write_padding(fout, int(t.n_bytes))
    w.close()
    return path.read_bytes()


def assert_gguf_writer_bytes(model: Path, manifest: Manifest, out: Path, scratch: Path) -> None:
    reader, layout = GGUFReader(model), model_layout(model)
    base = reference_metadata(reader)
    for i, info in enumerate(manifest.slices):
        want = reference_slice(reader, base, layout, info, i, len(manifest.slices), scratch / "reference.gguf")
        assert (out / info.file).read_bytes() == want, info.file


def test_real_slices_are_gguf_writer_bytes(sliced, tmp_path):
    assert_gguf_writer_bytes(sliced["model"], sliced["manifest"], sliced["out"], tmp_path)


def _patch(data: bytearray, key: str, at: int, new: bytes, order: str = "<") -> None:
    """Overwrite bytes of ``key``'s value, ``at`` bytes after its type tag."""
    i = data.index(struct.pack(order + "Q", len(key)) + key.encode()) + 8 + len(key) + 4 + at
    data[i:i + len(new)] = new


def write_rich(path: Path, *, big_endian: bool = False, alignment: int | None = None, large: bool = False,
               odd: bool = False, version: int | None = None, kv: dict | None = None) -> Path:
    """A 7-layer gemma3 (sliding window, default period 6, tied) whose metadata has every value type:
    scalars, strings (empty, non-ASCII, longer than the copy window with ``large``), arrays of every
    element type, per-layer arrays of numbers, bools and strings, a vocabulary and float scores that
    cross copy windows (``large``); tensors of 12 bytes (unaligned) and a Q8_0 one. ``odd``: BOOL bytes
    other than 0/1 and float32 signalling NaNs, which a reader-to-writer rewrite canonicalises.
    ``version``: the header's version number, patched."""
    order = ">" if big_endian else "<"
    n = 7
    w = GGUFWriter(str(path), "gemma3", endianess=GGUFEndian.BIG if big_endian else GGUFEndian.LITTLE)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint32("gemma3.block_count", n)
    w.add_uint32("gemma3.embedding_length", 8)
    w.add_uint32("gemma3.attention.sliding_window", 4)
    scalars = {GGUFValueType.UINT8: 200, GGUFValueType.INT8: -5, GGUFValueType.UINT16: 60000,
               GGUFValueType.INT16: -300, U32: 4_000_000_000, GGUFValueType.INT32: -7, F32: 0.1,
               GGUFValueType.UINT64: 2**63 + 5, GGUFValueType.INT64: -2**40, GGUFValueType.FLOAT64: 1 / 3,
               BOOL: True}
    for vtype, value in scalars.items():
        w.add_key_value(f"test.scalar.{vtype.name.lower()}", value, vtype)
        w.add_key_value(f"test.array.{vtype.name.lower()}", [value] * 3, ARR, sub_type=vtype)
    w.add_key_value("test.string.empty", "", STR)
    w.add_key_value("test.string.unicode", "नक्षत्र ✨", STR)
    w.add_key_value("test.strings", ["", "a", "नक्षत्र", "b" * 300], ARR, sub_type=STR)
    w.add_key_value("test.odd.bool", True, BOOL)
    w.add_key_value("test.odd.bools", [True, False, True, True], ARR, sub_type=BOOL)
    w.add_key_value("test.odd.f32", 1234.5, F32)
    w.add_key_value("test.odd.f32s", [1.0, 1234.5, float("nan"), -0.0, float("inf")], ARR, sub_type=F32)
    w.add_array("gemma3.attention.head_count", [4 - i % 2 for i in range(n)])
    w.add_key_value("gemma3.test.layer_bools", [i % 3 == 0 for i in range(n)], ARR, sub_type=BOOL)
    w.add_key_value("gemma3.test.layer_f32", [i / 7 for i in range(n)], ARR, sub_type=F32)
    w.add_key_value("gemma3.test.layer_u64", [2**40 + i for i in range(n)], ARR, sub_type=GGUFValueType.UINT64)
    w.add_key_value("gemma3.test.layer_names", [f"layer-{i}" * i for i in range(n)], ARR, sub_type=STR)
    w.add_array("gemma3.rope.dimension_sections", [1, 2, 3])  # not per-layer: kept whole
    w.add_string("tokenizer.ggml.model", "gpt2")
    if large:
        w.add_key_value("test.string.long", "ab" * (WINDOW // 2 + 3000), STR)
        tokens = [f"t{i}" * (i % 17) + "✨" * (i % 3 == 0) for i in range(25_000)]  # 1.3 MB
        w.add_array("tokenizer.ggml.tokens", tokens)
        scores = np.linspace(-1, 1, WINDOW // 4 + 1001, dtype=np.float32)  # not a whole number of windows
        scores[WINDOW // 4 + 7] = np.nan
        w.add_key_value("tokenizer.ggml.scores", scores.tolist(), ARR, sub_type=F32)
    else:
        w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    for key, (value, vtype, sub) in (kv or {}).items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    rng = np.random.default_rng(1)
    w.add_tensor("token_embd.weight", rng.standard_normal((3, 8), dtype=np.float32))
    w.add_tensor("rope_freqs.weight", np.ones(3, dtype=np.float32))  # 12 bytes: padded
    for i in range(n):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.standard_normal(3, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rng.integers(0, 255, (2, 34), dtype=np.uint8),
                     raw_dtype=GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_down.weight", rng.standard_normal((2, 3)).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    if odd:
        snan = struct.pack(order + "I", 0x7F800001)
        _patch(data, "test.odd.bool", 0, b"\x02", order)
        _patch(data, "test.odd.bools", 12, b"\x05\x00\xff", order)
        _patch(data, "test.odd.f32", 0, snan, order)
        _patch(data, "test.odd.f32s", 12 + 4, snan, order)
        _patch(data, "gemma3.test.layer_f32", 12 + 4 * 3, snan, order)
        _patch(data, "gemma3.test.layer_bools", 12 + 1, b"\x07", order)
    if version is not None:
        data[4:8] = struct.pack(order + "I", version)
    path.write_bytes(bytes(data))
    return path


def assert_scan_matches_reader(path: Path) -> None:
    """scan_gguf finds what GGUFReader finds: keys and their byte spans, types, values, alignment,
    tensor infos."""
    r, s = GGUFReader(path), scan_gguf(path)
    assert list(s.fields) == [k for k in r.fields if k not in ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")]
    for key, kv in s.fields.items():
        f = r.fields[key]
        assert (kv.offset, kv.end) == (f.offset, f.offset + sum(int(p.nbytes) for p in f.parts)), key
        assert kv.type == f.types[0], key
        if kv.type == ARR and kv.count:
            assert kv.sub_type == f.types[1], key
        assert repr(kv_value(s, key)) == repr(kv_value(r, key)), key  # repr: NaN == NaN
    assert (s.alignment, s.data_offset) == (r.alignment, r.data_offset)
    assert [(t.name, t.shape, t.tensor_type, t.n_elements, t.n_bytes, t.data_offset) for t in s.tensors] == [
        (t.name, tuple(int(x) for x in t.shape), t.tensor_type, t.n_elements, int(t.n_bytes), int(t.data_offset))
        for t in r.tensors]


RICH = {
    "plain": {},
    "large": {"large": True},
    "big-endian": {"big_endian": True},
    "align-64": {"alignment": 64},
    "align-1": {"alignment": 1},
    "odd-values": {"odd": True},
    "odd-values-large-big-endian": {"odd": True, "large": True, "big_endian": True},
    "version-2": {"version": 2},
}


@pytest.mark.parametrize("variant", list(RICH))
def test_rich_metadata_is_gguf_writer_bytes(tmp_path, tmp_out, variant):
    model = write_rich(tmp_path / "rich.gguf", **RICH[variant])
    assert_scan_matches_reader(model)
    # 5-5 has only full-attention layers (sliding_window 0); 6-6 is the last stage (tied embedding)
    m = slice_model(model, ranges=parse_ranges("0-1,2-4,5-5,6-6", 7), out_dir=tmp_out, progress=False)
    assert_gguf_writer_bytes(model, m, tmp_out, tmp_path)
    for info in m.slices:
        verify_slice(tmp_out / info.file)


def test_real_model_scan_matches_reader(smollm2_path):
    assert_scan_matches_reader(smollm2_path)


def test_nested_array(tmp_path, tmp_out):
    """GGUFReader reads nested arrays (flattened values) but they cannot be written: a clear error."""
    model = write_tiny(tmp_path / "n.gguf", kv={"test.nested": ([[1, 2], [3]], ARR, ARR),
                                                "test.nested_strings": ([["a"], ["b", "c"]], ARR, ARR)})
    assert_scan_matches_reader(model)
    assert kv_value(scan_gguf(model), "test.nested") == [1, 2, 3]
    assert model_layout(model).n_layer == 4
    with pytest.raises(SliceError, match="test.nested is an empty or nested array"):
        slice_model(model, n_parts=2, out_dir=tmp_out, progress=False)


def test_empty_array(tmp_path, tmp_out):
    model = write_tiny(tmp_path / "e.gguf", kv={"test.e": ([7], ARR, GGUFValueType.UINT8)})
    data = bytearray(model.read_bytes())
    # one element fewer, one key byte more: the same size, so every offset stays
    old = struct.pack("<Q", 6) + b"test.e" + struct.pack("<IIQ", ARR, GGUFValueType.UINT8, 1) + b"\x07"
    new = struct.pack("<Q", 7) + b"test.ee" + struct.pack("<IIQ", ARR, GGUFValueType.UINT8, 0)
    data[data.index(old):data.index(old) + len(old)] = new
    model.write_bytes(bytes(data))
    assert_scan_matches_reader(model)
    assert kv_value(scan_gguf(model), "test.ee") == []
    with pytest.raises(SliceError, match="test.ee is an empty or nested array"):
        slice_model(model, n_parts=2, out_dir=tmp_out, progress=False)


def _corrupt(data: bytearray, how: str) -> None:
    if how == "magic":
        data[0:4] = b"GGUG"
    elif how == "version-1":
        data[4:8] = struct.pack("<I", 1)
    elif how == "alignment-48":
        _patch(data, "general.alignment", 0, struct.pack("<I", 48))
    elif how == "alignment-type":
        _patch(data, "general.alignment", -4, struct.pack("<I", GGUFValueType.INT32))
    elif how == "duplicate-key":
        i = data.index(b"test.dup.b")
        data[i:i + 10] = b"test.dup.a"
    elif how == "duplicate-tensor":
        i = data.index(b"blk.1.attn_norm.weight")
        data[i:i + 22] = b"blk.0.attn_norm.weight"
    elif how == "value-type":
        _patch(data, "test.dup.a", -4, struct.pack("<I", 99))
    elif how == "tensor-type":
        i = data.index(b"output_norm.weight") + len("output_norm.weight") + 4 + 8
        data[i:i + 4] = struct.pack("<I", 99)
    elif how == "quant-row":  # a Q8_0 row of 16 elements: not a whole block of 32
        i = data.index(b"blk.0.ffn_up.weight") + len("blk.0.ffn_up.weight") + 4
        data[i:i + 8] = struct.pack("<Q", 16)
    elif how == "bad-utf8-key":
        i = data.index(b"test.dup.a")
        data[i] = 0xFF
    elif how == "reader-field-name":
        i = data.index(b"test.dup.a")
        data[i - 8:i + 10] = struct.pack("<Q", 10) + b"GGUF.kv_co"  # 'GGUF.kv_co' is not a reader field
    else:
        raise AssertionError(how)


def gguf_reader_opens(path: Path) -> bool:
    """Whether gguf.GGUFReader (the reference parser) opens ``path``: the errors it raises on a
    malformed file are the ones slicer._opened turns into SliceError."""
    try:
        GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError):
        return False
    return True


@pytest.mark.parametrize("how", ["magic", "version-1", "alignment-48", "alignment-type", "duplicate-key",
                                 "duplicate-tensor", "value-type", "tensor-type", "quant-row", "bad-utf8-key"])
def test_scan_refuses_what_gguf_reader_refuses(tmp_path, tmp_out, how):
    model = write_rich(tmp_path / "bad.gguf", alignment=64,
                       kv={"test.dup.a": (1, U32, None), "test.dup.b": (2, U32, None)})
    data = bytearray(model.read_bytes())
    _corrupt(data, how)
    model.write_bytes(bytes(data))
    assert not gguf_reader_opens(model)
    with pytest.raises(SliceError, match="is not a GGUF file"):
        scan_gguf(model)
    with pytest.raises(SliceError, match="is not a GGUF file"):
        slice_model(model, n_parts=2, out_dir=tmp_out, progress=False)


def test_gguf_prefixed_key_is_dropped_as_before(tmp_path, tmp_out):
    model = write_rich(tmp_path / "g.gguf", kv={"test.dup.a": (1, U32, None)})
    data = bytearray(model.read_bytes())
    _corrupt(data, "reader-field-name")
    model.write_bytes(bytes(data))
    assert_scan_matches_reader(model)
    m = slice_model(model, n_parts=2, out_dir=tmp_out, progress=False)
    assert_gguf_writer_bytes(model, m, tmp_out, tmp_path)
    assert "GGUF.kv_co" not in summarize(tmp_out / m.slices[0].file)["keys"]


def test_truncated_anywhere_is_refused_as_gguf_reader_does(tmp_path):
    """Cut a small model at many lengths: scan_gguf opens exactly the prefixes GGUFReader opens."""
    full = write_rich(tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in [*range(0, len(full), 13), len(full) - 1]:
        cut.write_bytes(full[:n])
        try:
            scan_gguf(cut)
            scanned = True
        except SliceError as e:
            assert "is not a GGUF file" in str(e)
            scanned = False
        assert scanned == gguf_reader_opens(cut), (n, len(full), scanned)


def test_a_stage_refuses_a_slice_its_manifest_does_not_record(smollm2_path, tmp_path):
    import shutil

    from nakshatra.errors import NakError
    from nakshatra.server.serve import resolve_slice

    a, b = tmp_path / "a", tmp_path / "b"
    ma = slice_model(smollm2_path, [LayerRange(0, 10), LayerRange(10, 30)], out_dir=a, progress=False)
    mb = slice_model(smollm2_path, [LayerRange(0, 15), LayerRange(15, 30)], out_dir=b, progress=False)
    first = a / ma.slices[0].file
    assert resolve_slice(first, None)[0] == first  # as recorded: served
    shutil.copyfile(b / mb.slices[0].file, first)  # another (valid) slice under the recorded name
    with pytest.raises(NakError, match=r"not the slice .*manifest.*re-run nak slice"):
        resolve_slice(first, None)
