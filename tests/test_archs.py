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
    ("gemma2", "transforms the input before the first layer (inpL = ggml_scale(ctx0, inpL, sqrtf(n_embd)))"),
    ("gemma", "transforms the input before the first layer"),
    ("bloom", "transforms the input before the first layer (inpL = build_norm(inpL, model.tok_norm"),
    ("gpt2", "transforms the input before the first layer (inpL = ggml_add(ctx0, inpL, pos))"),
    ("no-such-arch", "the pinned llama.cpp has no graph builder for architecture 'no-such-arch'"),
    ("smollm3", "computes with the layer index (const bool use_rope = (il + 1) % hparams.n_no_rope_layer_step"),
    ("deepseek2", "computes with the layer index (if ((uint32_t) il < hparams.n_layer_dense_lead) {)"),
])
def test_refused_with_the_reason(arch: str, reason: str):
    s = archs.split_support(arch)
    assert not s.ok and reason in s.reason


def test_a_token_only_transform_is_not_a_reason():
    # gemma3 scales by sqrt(n_embd) only token input (ubatch.token ? ... : 1.0f)
    [t] = [t for t in archs.arch_table()["gemma3"]["input_transforms"] if t["op"] == "ggml_scale"]
    assert t["tokens_only"] and "ubatch.token" in t["statement"]


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
    r = subprocess.run([sys.executable, "-m", "nakshatra.gguf.archs", "llama", "gemma2"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "llama: can be split" in r.stdout and "gemma2: cannot be split" in r.stdout
