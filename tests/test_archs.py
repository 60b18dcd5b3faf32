"""Which architectures nak slice cuts (python/nakshatra/gguf/archs.py) and the facts it decides
from, read out of the patched llama.cpp at build time (cpp/cmake/arch_table.py).

No model is run here: tests/test_chain.py runs the verified architectures split against unsplit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from nakshatra.bench.rpc_baseline import build_info
from nakshatra.gguf import archs
from nakshatra.gguf.inspection import inspect_gguf, render_inspection

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architectures.md"
sys.path.insert(0, str(ROOT / "cpp" / "cmake"))
import arch_table  # noqa: E402


def test_docs_page_is_current():
    assert DOC.read_text() == archs.markdown(), (
        "docs/architectures.md is stale: python -m nakshatra.gguf.archs --markdown > docs/architectures.md")


def test_the_installed_table_is_the_pinned_source_read_again():
    src = Path(build_info()["llama_source_dir"])
    assert arch_table.arch_table(src)["archs"] == archs.arch_table()


@pytest.mark.parametrize("arch", archs.VERIFIED)
def test_verified_architectures_pass_every_rule(arch: str):
    facts = archs.arch_table()[arch]
    assert facts["names_l_out"] and not (facts["recurrent"] or facts["hybrid"] or facts["diffusion"])
    assert all(t["tokens_only"] for t in facts["input_transforms"])
    assert archs.split_support(arch).ok


@pytest.mark.parametrize("arch, reason", [
    ("mamba", "mamba keeps recurrent state per sequence"),
    ("rwkv7", "rwkv7 keeps recurrent state per sequence"),
    ("jamba", "jamba keeps hybrid (attention and recurrent) state per sequence"),
    ("llada", "llada is a diffusion model"),
    ("bert", "src/models/bert.cpp) does not name its layer outputs 'l_out'"),
    ("afmoe", "transforms the input before the first layer (inpL = ggml_scale(ctx0, inpL, sqrtf(float(n_embd))))"),
    ("minicpm3", "transforms the input before the first layer (inpL = ggml_scale(ctx0, inpL, scale_embd))"),
    ("bloom", "transforms the input before the first layer (inpL = build_norm(inpL, model.tok_norm"),
    ("gpt2", "transforms the input before the first layer (inpL = ggml_add(ctx0, inpL, pos))"),
    ("no-such-arch", "the pinned llama.cpp has no graph builder for architecture 'no-such-arch'"),
    ("ernie4_5-moe", "computes with the layer index (static_cast<uint32_t>(il) >= hparams.n_layer_dense_lead && "
                     "(il + 1) % hparams.n_moe_layer_step == 0;)"),
    ("exaone4", "tells the model's variant by its layer count (if (hparams.n_layer() == 64) {)"),
    ("baichuan", "tells the model's variant by its layer count (switch (hparams.n_layer()) {)"),
])
def test_refused_with_the_reason(arch: str, reason: str):
    s = archs.split_support(arch)
    assert not s.ok and reason in s.reason


@pytest.mark.parametrize("arch", ["gemma3", "gemma2", "gemma"])
def test_a_token_only_transform_is_not_a_reason(arch: str):
    # gemma3 scales by sqrt(n_embd) only token input (ubatch.token ? ... : 1.0f); patch 0002 makes
    # gemma and gemma2, which scaled every input, do the same
    [t] = [t for t in archs.arch_table()[arch]["input_transforms"] if t["op"] == "ggml_scale"]
    assert t["tokens_only"] and "ubatch.token" in t["statement"]


def test_handled_layer_index_uses_are_not_reasons():
    table = archs.arch_table()
    # leading dense layers: the slicer rebases leading_dense_block_count on each slice
    assert table["deepseek2"]["layer_index_uses"] == ["if ((uint32_t) il < hparams.n_layer_dense_lead) {"]
    assert archs.unhandled_index_uses(table["deepseek2"]) == []
    assert archs.unhandled_index_uses(table["glm4moe"]) == []
    # ... but not when the same line also counts every Nth layer
    assert archs.unhandled_index_uses(table["ernie4_5-moe"])
    # SmolLM3's every-4th-layer-without-RoPE counts from the slice's global start (patch 0002)
    assert table["smollm3"]["layer_index_uses"] == []


def test_loader_facts():
    table = archs.arch_table()
    assert table["gemma2"]["swa_pattern"] == {"period": 2, "dense_first": False}
    assert table["cohere2moe"]["swa_pattern"] == {"period": 4, "dense_first": True}
    assert table["llama"]["swa_pattern"] is None
    # patched to read the whole model's layer count
    assert table["gemma2"]["size_uses"] == [] and table["deepseek2"]["size_uses"] == []
    # a switch that only names the model type changes nothing
    assert table["llama"]["size_uses"] == []


def test_shared_builders_are_followed():
    table = archs.arch_table()
    # granitemoe declares `using graph = llama_model_granite::graph`
    assert table["granitemoe"]["builder"] == "llama_model_granite" and table["granitemoe"]["names_l_out"]
    assert sum(1 for a in table.values() if a["names_l_out"]) >= 120


def test_inspect_and_the_cli_say_why(tmp_path: Path):
    from test_slicer import write_tiny

    model = write_tiny(tmp_path / "m.gguf", arch="mamba")
    info = inspect_gguf(model)
    assert info["split"]["ok"] is False and "recurrent" in info["split"]["reason"]
    console = Console(record=True, width=400)
    console.print(render_inspection(info))  # what nak inspect prints (it adds llama.cpp's footprint)
    text = console.export_text()
    assert "can be split" in text and "no: mamba keeps recurrent state" in text
    r = subprocess.run([sys.executable, "-m", "nakshatra.gguf.archs", "llama", "afmoe"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "llama: can be split" in r.stdout and "afmoe: cannot be split" in r.stdout
