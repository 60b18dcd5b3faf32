"""A stage's memory footprint: llama.cpp's own estimate of what it allocates (no_alloc load with
the stage's parameters, cpp/stage/memory_estimate.cpp), the prediction built on it
(nakshatra.gguf.memory), and the footprint measured under a cgroup memory limit
(nakshatra.bench.footprint)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hostemu import require_cgroup_memory
from nakshatra import _nakshatra
from nakshatra.bench.footprint import MIB, THRASH_FAULTS, _Chain
from nakshatra.cluster.plan import model_memory
from nakshatra.errors import NakError, StageError
from nakshatra.gguf.inspection import inspect_gguf
from nakshatra.gguf.memory import PROCESS_BASELINE_BYTES, llama_estimate, predict_stage
from nakshatra.ranges import LayerRange
from nakshatra.server.local import cached_parts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_parts(smollm2_path: Path) -> list[Path]:
    """SmolLM2 cut in 3 (0-5, 6-24, 25-29), cached."""
    return cached_parts(smollm2_path, 3, progress=False)


def _load_log(path: Path, ctx: int, max_sessions: int) -> dict[str, float]:
    """The buffer sizes llama.cpp logs when a stage really loads ``path`` (MiB, as it prints them)."""
    code = ("from nakshatra import _nakshatra; _nakshatra.set_log_level(2); "
            f"_nakshatra.Stage({str(path)!r}, n_ctx={ctx}, max_sessions={max_sessions}, n_threads=1)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = {}
    for what, rx in (("model", r"(\S+) model buffer size =\s+([\d.]+) MiB"),
                     ("output", r"(\S+)\s+output buffer size =\s+([\d.]+) MiB"),
                     ("kv", r"(\S+) KV buffer size =\s+([\d.]+) MiB"),
                     ("compute", r"(\S+) compute buffer size =\s+([\d.]+) MiB")):
        for m in re.finditer(rx, r.stderr):
            out[f"{what}:{m.group(1)}"] = out.get(f"{what}:{m.group(1)}", 0.0) + float(m.group(2))
    return out


@pytest.mark.parametrize("which", [0, 1, 2])
def test_estimate_matches_what_llama_cpp_allocates(smollm2_parts: list[Path], which: int) -> None:
    """The no_alloc estimate of each SmolLM2 slice gives the buffers llama.cpp logs when the stage
    loads for real with the same parameters (the weights are mmap'd there: CPU_Mapped)."""
    path = smollm2_parts[which]
    e = llama_estimate(path, ctx=512, max_sessions=2)
    log = _load_log(path, 512, 2)
    (cpu,) = e["buffers"]  # Q4_1 / Q8_0 SmolLM2: nothing is repacked, one CPU buffer type
    assert (cpu["name"], cpu["host"], cpu["mapped"]) == ("CPU", True, True)
    assert cpu["model"] / MIB == pytest.approx(log["model:CPU_Mapped"], abs=0.006)
    assert cpu["context"] / MIB == pytest.approx(log["kv:CPU"], abs=0.006)
    assert cpu["compute"] / MIB == pytest.approx(log["compute:CPU"], abs=0.006)
    # the output buffer: a row of logits (last stage) or of hidden states per output, for the
    # most rows a decode asks for: on the last stage a speculative window's rows per session
    # (it reserves one per session at start, which the log shows, and grows on demand), every row
    # of a batch elsewhere
    row = 4 * (e["n_vocab"] if e["is_last"] else e["n_embd_out"])
    assert e["output_rows_max"] == (2 * (1 + _nakshatra.STAGE_DRAFT_MAX) if e["is_last"] else 1024)
    assert e["output_bytes"] == row * e["output_rows_max"]
    if e["is_last"]:
        assert row * 2 / MIB == pytest.approx(log["output:CPU"], abs=0.006)
    assert (e["is_first"], e["is_last"]) == (which == 0, which == 2)
    # the slice's range as the stage reads it; llama.cpp's KV is what nak inspect counts
    assert (e["layer_start"], e["layer_end"], e["n_layer_full"]) == ((0, 6), (6, 25), (25, 30))[which] + (30,)
    assert cpu["context"] == inspect_gguf(path, n_ctx=512, max_sessions=2)["kv_bytes"]
    assert e["heap_known"] and 4 * MIB < e["heap_bytes"] < 64 * MIB  # the vocabulary, chiefly


def test_last_stage_reserves_one_window_of_output_rows_per_session(smollm2_parts: list[Path]) -> None:
    """The last stage samples one row per session, or a speculative window's (at most 1 +
    STAGE_DRAFT_MAX): its compute buffer is not sized for n_batch rows of logits (49152 x 512
    floats, 96 MiB for SmolLM2)."""
    last = llama_estimate(smollm2_parts[2], ctx=512, max_sessions=1)
    first = llama_estimate(smollm2_parts[0], ctx=512, max_sessions=1)
    assert sum(b["compute"] for b in last["buffers"]) < 2 * sum(b["compute"] for b in first["buffers"])


def test_bad_input_gives_a_clear_error(tmp_path: Path, smollm2_parts: list[Path]) -> None:
    """Checked before llama.cpp sees it (it aborts on some bad input instead of failing)."""
    with pytest.raises(StageError, match="No such file"):
        _nakshatra.estimate_memory(str(tmp_path / "missing.gguf"))
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a model" * 10)
    with pytest.raises(StageError, match="not a GGUF"):
        _nakshatra.estimate_memory(str(not_gguf))
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(smollm2_parts[0].read_bytes()[:4096])
    with pytest.raises(StageError, match="could not read"):
        _nakshatra.estimate_memory(str(truncated))
    with pytest.raises(StageError, match="--max-sessions"):
        _nakshatra.estimate_memory(str(smollm2_parts[0]), max_sessions=0)
    with pytest.raises(StageError, match="cache type"):
        _nakshatra.estimate_memory(str(smollm2_parts[0]), cache_type_k="f17")
    with pytest.raises(NakError, match="no such file"):
        predict_stage(tmp_path / "missing.gguf")
    with pytest.raises(NakError, match="not a GGUF"):
        predict_stage(not_gguf)
    with pytest.raises(NakError, match="--ctx"):
        predict_stage(smollm2_parts[0], ctx=0)


def test_prediction_terms(smollm2_parts: list[Path], gemma3_path: Path) -> None:
    """What the prediction counts: the first stage only the embedding rows a context can touch;
    a tied model's last stage its whole embedding (the LM head); the process baseline on each."""
    first = predict_stage(smollm2_parts[0], ctx=512, max_sessions=1)
    info = inspect_gguf(smollm2_parts[0])
    embd = info["tensors"]["input"]["bytes"]
    assert first["embd_rows_bytes"] == 512 * 4096  # 512 rows, each on its own page at most
    assert first["mapped_weights_bytes"] == info["weights_bytes"] - embd + first["embd_rows_bytes"]
    last = predict_stage(smollm2_parts[2], ctx=512, max_sessions=1)
    assert last["mapped_weights_bytes"] == inspect_gguf(smollm2_parts[2])["weights_bytes"]
    for p in (first, last):
        assert p["baseline_bytes"] == PROCESS_BASELINE_BYTES
        assert p["total_bytes"] == sum(p[k] for k in ("copied_weights_bytes", "mapped_weights_bytes", "kv_bytes",
                                                      "compute_bytes", "output_bytes", "llama_heap_bytes",
                                                      "io_bytes", "baseline_bytes"))
    # the whole tied model as one stage: its embedding is also its LM head, read in full
    whole = predict_stage(gemma3_path, ctx=512, max_sessions=1)
    assert whole["embd_rows_bytes"] == 0
    assert whole["copied_weights_bytes"] + whole["mapped_weights_bytes"] == inspect_gguf(gemma3_path)["weights_bytes"]


def test_plan_and_inspect_agree(smollm2_path: Path, smollm2_parts: list[Path]) -> None:
    """nak plan's memory model of a stage (per-kind fixed costs from one-layer slices) predicts
    what nak inspect predicts for the slice itself, within 2%."""
    mem = model_memory(smollm2_path, ctx=512, max_sessions=1)
    for path, rng in zip(smollm2_parts, (LayerRange(0, 6), LayerRange(6, 25), LayerRange(25, 30))):
        assert mem.stage_bytes(rng) == pytest.approx(predict_stage(path, ctx=512, max_sessions=1)["total_bytes"],
                                                     rel=0.02)
    one = predict_stage(smollm2_path, ctx=512, max_sessions=1)["total_bytes"]
    assert mem.stage_bytes(LayerRange(0, 30)) == pytest.approx(one, rel=0.01)


def test_stage_runs_in_its_predicted_footprint(smollm2_parts: list[Path]) -> None:
    """The middle stage of SmolLM2 in a cgroup capped at its prediction + 10% completes a
    full-context generation (ctx 256) with the tokens of the unconstrained run and without
    thrashing; capped at a third of the prediction it fails, and the failure is reported (OOM
    kill or thrashing), not waited on for ever."""
    require_cgroup_memory()
    pred = predict_stage(smollm2_parts[1], ctx=256, max_sessions=1)["total_bytes"]
    with _Chain(smollm2_parts, 1, ctx=256, max_sessions=1, threads=0) as chain:
        ref, want, prompt = chain.trial(None, None, 16, None, deadline_s=300.0)
        assert ref.outcome == "fits" and len(want) == 16 and len(prompt) == 241, ref
        t, got, _ = chain.trial(int(pred * 1.1), prompt, 16, want, deadline_s=300.0, base_faults=ref.steady_faults)
        assert t.outcome == "fits", t
        assert got == want
        assert t.steady_faults <= ref.steady_faults + THRASH_FAULTS
        assert t.peak_bytes <= int(pred * 1.1)
        low, _, _ = chain.trial(int(pred * 0.33), prompt, 16, want, deadline_s=120.0, base_faults=ref.steady_faults)
        assert low.outcome in ("oom", "thrash"), low
        assert low.detail
