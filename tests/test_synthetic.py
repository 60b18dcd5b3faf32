"""Synthetic random-weight GGUFs: metadata (read back with gguf.GGUFReader), tensor names and
shapes as the pinned llama.cpp loaders expect them, determinism, size picking and errors.

The tensor names and shapes come from llama.cpp itself: ``tensor_specs`` loads metadata-only
files until the loader is satisfied. Its loader (``llama_model_loader``) refuses a file whose
tensor is missing, has other dimensions than the architecture's loader asks for
(``check_tensor_dims``), or is left unused (``done_getting_tensors``); each architecture's file is
loaded and decoded, and files with one tensor dropped, added or reshaped are shown to be refused.
Split-vs-unsplit tests on these models live elsewhere.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from nakshatra import _nakshatra
from nakshatra.errors import ModelError, StageError
from nakshatra.gguf.synthetic import (
    ARCH_KV,
    ARCHS,
    MOE_ARCHS,
    llama_dims_for_params,
    tensor_specs,
    write_synthetic,
    write_synthetic_llama_of_size,
)

F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16


def _field(r: gguf.GGUFReader, key: str):
    return r.fields[key].contents()


def _tensors(r: gguf.GGUFReader) -> dict[str, tuple[tuple[int, ...], gguf.GGMLQuantizationType]]:
    """name -> (ggml ne, type)"""
    return {t.name: (tuple(int(x) for x in t.shape), t.tensor_type) for t in r.tensors}


@pytest.fixture(scope="module")
def source(smollm2_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_path)  # parsing the 49k-token vocabulary takes seconds


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata_and_tensors(arch: str, smollm2_path: Path, source: gguf.GGUFReader,
                              tmp_path: Path) -> None:
    n_vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    path = write_synthetic(tmp_path / f"{arch}.gguf", arch, n_layer=3, tokenizer_from=smollm2_path)
    r = gguf.GGUFReader(path)

    assert _field(r, "general.architecture") == arch
    expect = {"block_count": 3, "embedding_length": 64, "feed_forward_length": 128,
              "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": n_vocab,
              **ARCH_KV.get(arch, {})}
    for key, value in expect.items():
        assert _field(r, f"{arch}.{key}") == pytest.approx(value), key
    for key in ("context_length", "attention.layer_norm_rms_epsilon", "rope.freq_base"):
        assert f"{arch}.{key}" in r.fields
    # the whole tokenizer is copied verbatim (the big arrays compared for one arch: slow)
    for key, f in source.fields.items():
        if key.startswith("tokenizer.") and (arch == "llama" or len(f.data) == 1):
            assert r.fields[key].contents() == f.contents(), key
        elif key.startswith("tokenizer."):
            assert len(r.fields[key].data) == len(f.data), key

    got = _tensors(r)
    assert all(t == F32 for _, t in got.values())
    assert got["token_embd.weight"][0] == (64, n_vocab)
    # the LM head: its own unless the architecture always ties it to the token embedding
    assert got.get("output.weight", ((64, n_vocab),))[0] == (64, n_vocab)
    assert got["blk.2.attn_output.weight"][0] == (64, 64)
    # llama.cpp's loader takes every tensor, with the shapes its loader for this arch asks for,
    # and the model decodes (its greedy tokens are real vocabulary ids)
    toks = _load_and_generate(path)
    assert len(toks) <= 4 and all(0 <= t < n_vocab for t in toks)


def _load_and_generate(path: Path) -> list[int]:
    """Load ``path`` with the pinned llama.cpp (raises StageError when its loader refuses the
    file), prefill a prompt and decode greedily: up to 4 tokens (fewer if a random model picks
    an end-of-generation token)."""
    ref = _nakshatra.Reference(str(path), n_ctx=64, n_threads=1)
    return ref.generate(ref.tokenize("The sea is"), 4, temp=0.0)


@pytest.mark.parametrize("change", ["drop", "extra", "reshape"])
def test_llama_cpp_refuses_a_file_unlike_its_loader(change: str, smollm2_path: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """The oracle above can fail: the same writer with one tensor dropped, one added or one
    reshaped produces a file llama.cpp refuses, naming the tensor."""
    import nakshatra.gguf.synthetic as synthetic
    from nakshatra.gguf.synthetic import TensorSpec

    real = synthetic.tensor_specs

    def altered(*a, **kw):
        specs = real(*a, **kw)
        if change == "drop":
            return [s for s in specs if s.name != "blk.1.ffn_up.weight"]
        if change == "extra":
            return [*specs, TensorSpec("blk.1.ffn_up_extra.weight", (64, 128))]
        return [TensorSpec(s.name, (64, 96), s.kind) if s.name == "blk.1.ffn_up.weight" else s for s in specs]

    monkeypatch.setattr(synthetic, "tensor_specs", altered)
    path = write_synthetic(tmp_path / f"{change}.gguf", "llama", n_layer=2, tokenizer_from=smollm2_path)
    capfd.readouterr()
    with pytest.raises(StageError, match="could not load") as e:
        _nakshatra.Reference(str(path), n_ctx=64, n_threads=1)
    log = capfd.readouterr().err
    want = {"drop": "tensor 'blk.1.ffn_up.weight' not found",
            "extra": "wrong number of tensors; expected 22, got 21",
            "reshape": "tensor 'blk.1.ffn_up.weight' has wrong shape"}[change]
    assert want in str(e.value)  # llama.cpp's own reason, kept from its log (cpp/stage/llama_log.cpp)
    assert want in log, log


def test_arch_specific_tensors(smollm2_path: Path, tmp_path: Path) -> None:
    """What llama.cpp asked for, per architecture (nothing here is written down in the writer)."""
    def names(arch: str) -> dict:
        moe = arch in MOE_ARCHS
        return {s.name: s.ne for s in tensor_specs(arch, n_layer=3, n_embd=64, n_head=4, n_head_kv=2, n_ff=128,
                                                   n_vocab=100, n_expert=4 if moe else 0,
                                                   n_expert_used=2 if moe else 0)}
    llama = names("llama")
    assert {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"} <= llama.keys()
    assert not any("bias" in n or "attn_q_norm" in n for n in llama)
    assert names("qwen2")["blk.0.attn_k.bias"] == (32,)            # 2 kv heads x 16
    assert names("qwen3")["blk.0.attn_q_norm.weight"] == (16,)     # head size
    phi3 = names("phi3")
    assert phi3["blk.0.attn_qkv.weight"] == (64, 64 + 2 * 32)      # fused q, k, v
    assert phi3["blk.0.ffn_up.weight"] == (64, 2 * 128)            # fused gate and up
    assert "blk.0.attn_q.weight" not in phi3 and "blk.0.ffn_gate.weight" not in phi3
    moe = names("qwen3moe")
    assert moe["blk.0.ffn_gate_inp.weight"] == (64, 4)
    assert moe["blk.0.ffn_down_exps.weight"] == (128, 64, 4)
    assert "blk.0.ffn_gate.weight" not in moe
    gemma = names("gemma3")
    assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight",
            "blk.0.attn_k_norm.weight"} <= gemma.keys()
    # DeepSeek V2: multi-head latent attention (low-rank q and kv, 24-wide heads of which 8 RoPE),
    # two leading dense layers, then experts with a shared one
    ds = names("deepseek2")
    assert ds["blk.0.attn_q_a.weight"] == (64, 32) and ds["blk.0.attn_q_b.weight"] == (32, 4 * 24)
    assert ds["blk.0.attn_kv_a_mqa.weight"] == (64, 32 + 8)
    assert ds["blk.0.attn_k_b.weight"] == (16, 32, 4) and ds["blk.0.attn_v_b.weight"] == (32, 16, 4)
    assert "blk.1.ffn_gate.weight" in ds and "blk.1.ffn_gate_inp.weight" not in ds
    assert ds["blk.2.ffn_gate_inp.weight"] == (64, 4) and "blk.2.ffn_gate_shexp.weight" in ds
    assert "blk.2.ffn_gate.weight" not in ds
    oss = names("gpt-oss")  # attention sinks, biased experts
    assert oss["blk.0.attn_sinks.weight"] == (4,) and oss["blk.0.ffn_up_exps.bias"] == (128, 4)
    # Gemma 2 always ties the LM head to the token embedding: llama.cpp never asks for one
    assert "output.weight" not in names("gemma2") and "output.weight" in llama
    kinds = {s.name: s.kind for s in tensor_specs("phi2", n_layer=1, n_embd=64, n_head=4, n_head_kv=2, n_ff=128,
                                                  n_vocab=100)}
    assert kinds["blk.0.attn_norm.weight"] == "norm" and kinds["blk.0.attn_norm.bias"] == "bias"

    r = gguf.GGUFReader(write_synthetic(tmp_path / "moe.gguf", "qwen3moe", n_layer=1, n_expert=8,
                                        n_expert_used=3, tokenizer_from=smollm2_path))
    assert _field(r, "qwen3moe.expert_count") == 8
    assert _field(r, "qwen3moe.expert_used_count") == 3
    assert _field(r, "qwen3moe.expert_feed_forward_length") == 128


def test_a_missing_metadata_key_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import nakshatra.gguf.synthetic as synthetic

    kv = {k: v for k, v in ARCH_KV["deepseek2"].items() if k != "attention.q_lora_rank"}
    monkeypatch.setitem(synthetic.ARCH_KV, "deepseek2", kv)
    with pytest.raises(ModelError, match="needs the metadata key deepseek2.attention.q_lora_rank"):
        tensor_specs("deepseek2", n_layer=2, n_embd=64, n_head=4, n_head_kv=1, n_ff=128, n_vocab=100,
                     n_expert=4, n_expert_used=2)


def test_tied_omits_output(smollm2_path: Path, tmp_path: Path) -> None:
    r = gguf.GGUFReader(write_synthetic(tmp_path / "t.gguf", "llama", n_layer=1, tied=True,
                                        tokenizer_from=smollm2_path))
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


@pytest.mark.parametrize("dtype, qtype", [("f16", F16), ("q8_0", gguf.GGMLQuantizationType.Q8_0),
                                          ("q4_0", gguf.GGMLQuantizationType.Q4_0)])
def test_dtypes(dtype: str, qtype, smollm2_path: Path, tmp_path: Path) -> None:
    # n_ff 48 is not a multiple of the 32-wide quant block: ffn_down rows fall back to F16
    r = gguf.GGUFReader(write_synthetic(tmp_path / "q.gguf", "qwen2", n_layer=1, n_ff=48, dtype=dtype,
                                        tokenizer_from=smollm2_path))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["token_embd.weight"] == qtype
    assert types["blk.0.attn_q.weight"] == qtype
    assert types["blk.0.ffn_down.weight"] == (qtype if dtype == "f16" else F16)
    assert types["blk.0.attn_norm.weight"] == F32 and types["blk.0.attn_q.bias"] == F32
    assert _field(r, "general.file_type") == int(gguf.LlamaFileType[
        "MOSTLY_" + dtype.upper()])


def test_weights_deterministic_and_nondegenerate(smollm2_path: Path, tmp_path: Path) -> None:
    kw = {"n_layer": 1, "tokenizer_from": smollm2_path}
    a = write_synthetic(tmp_path / "a.gguf", "llama", seed=1, **kw)
    b = write_synthetic(tmp_path / "b.gguf", "llama", seed=1, **kw)
    c = write_synthetic(tmp_path / "c.gguf", "llama", seed=2, **kw)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    t = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(a).tensors}
    q = t["blk.0.attn_q.weight"]
    assert q.std() == pytest.approx(1 / math.sqrt(64), rel=0.1)   # fan-in scaled
    assert np.all(t["blk.0.attn_norm.weight"] == 1.0)
    assert not (tmp_path / "a.gguf.partial").exists()


def test_llama_dims_for_params() -> None:
    for n in (1e8, 1.5e9, 7e9):
        for tied in (False, True):
            d = llama_dims_for_params(n, 49152, tied)
            assert d["n_embd"] % d["n_head"] == 0 and d["n_head"] % d["n_head_kv"] == 0
            specs = tensor_specs("llama", n_vocab=49152, tied=tied, **d)
            total = sum(math.prod(s.ne) for s in specs)
            assert total == pytest.approx(n, rel=0.03)
    assert llama_dims_for_params(1.5e9, 49152)["n_embd"] == 2048
    with pytest.raises(ValueError, match="too small"):
        llama_dims_for_params(1e6, 49152)


def test_llama_of_size(smollm2_path: Path, tmp_path: Path) -> None:
    r = gguf.GGUFReader(write_synthetic_llama_of_size(tmp_path / "m.gguf", 1e8,
                                                      tokenizer_from=smollm2_path))
    total = sum(int(t.n_elements) for t in r.tensors)
    assert total == pytest.approx(1e8, rel=0.03)
    assert r.fields["llama.block_count"].contents() == 16
    assert {t.tensor_type for t in r.tensors} == {F32, gguf.GGMLQuantizationType.Q4_0}


def test_errors(smollm2_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic architecture"):
        write_synthetic(tmp_path / "x.gguf", "gpt2", tokenizer_from=smollm2_path)
    with pytest.raises(ValueError, match="unknown dtype"):
        write_synthetic(tmp_path / "x.gguf", "llama", dtype="q5_k", tokenizer_from=smollm2_path)
    with pytest.raises(ValueError, match="bad shape"):
        write_synthetic(tmp_path / "x.gguf", "llama", n_embd=60, n_head=8, tokenizer_from=smollm2_path)
    with pytest.raises(ValueError, match="n_expert_used"):
        write_synthetic(tmp_path / "x.gguf", "qwen3moe", n_expert_used=5, tokenizer_from=smollm2_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="tokenizer source"):
        write_synthetic(tmp_path / "x.gguf", "llama", tokenizer_from=junk)
    with pytest.raises(ModelError, match="tokenizer source"):
        write_synthetic(tmp_path / "x.gguf", "llama", tokenizer_from=tmp_path / "missing.gguf")
    assert not (tmp_path / "x.gguf").exists()
