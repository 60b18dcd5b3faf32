"""GPU stages: run when the installed extension is a GPU build (``cpp/gpu/run.sh cuda|vulkan``
makes one); the GPU tests need a device of that backend as well. Elsewhere (the CPU build CI
runs) the module is skipped.

On one GPU: a chain of GPU stages equals the unsplit model on the same GPU fed the same batches
(greedy tokens; the hidden state at every cut byte for byte), as the CPU chain equals it on the
CPU; a GPU stage (``-ngl 99``) generates alone, equal to the unsplit model on the GPU, and beside
CPU stages (``--device none``). A mixed chain runs other kernels than an all-CPU one, so it need
not agree token for token: the tests ask for the same first token and report how far the two
agree (``NAK_GPU_REPORT``: a JSON file to write).

Vulkan without a GPU: Mesa's lavapipe (llvmpipe) is a Vulkan device that runs on the CPU; ggml
uses a CPU-type device only when it is named in ``GGML_VK_VISIBLE_DEVICES`` (``cpp/gpu/run.sh``
sets it when lavapipe is all there is).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nakshatra import _nakshatra
from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.server.local import LocalStages
from test_chain import CHAINS_GEMMA3, CHAINS_SMOLLM2, CTX, chain_run, cut

# asked in a child process: the tests' own process then initialises the GPU only in the tests
# that need it (the CUDA runtime, initialised at import, segfaulted later in that process on the
# H200 machine)
INFO = json.loads(subprocess.run([sys.executable, "-c", "import json; from nakshatra import _nakshatra; "
                                  "print(json.dumps(_nakshatra.build_info()))"],
                                 capture_output=True, text=True, check=True).stdout.splitlines()[-1])
# ggml's backend name per build (ggml_backend_reg_name)
GGML_NAME = {"cuda": "CUDA", "vulkan": "Vulkan", "rocm": "ROCm", "metal": "Metal"}
BACKEND = INFO["backend"]
pytestmark = pytest.mark.skipif(BACKEND == "cpu", reason="not a GPU build (cpp/gpu/run.sh builds one and runs these)")
gpu = pytest.mark.skipif(BACKEND == "cpu" or not INFO.get("devices"),
                         reason="not a GPU build" if BACKEND == "cpu" else f"no {BACKEND} device visible")

GREEDY = SamplerParams(temp=0.0)
# prompts SmolLM2 continues for all N tokens (questions without the chat template end at once)
PROMPTS = ["Once upon a time", "The sun is", "Write a list of fruits:", "In 1969, humans"]
N = 48
GPU = ["--n-gpu-layers", "99"]
CPU = ["--device", "none"]


def test_the_build_is_a_gpu_build_and_doctor_says_so() -> None:
    assert GGML_NAME[BACKEND] in INFO["ggml_backends"]
    out = subprocess.run([sys.executable, "-m", "nakshatra_cli.main", "doctor"], capture_output=True, text=True,
                         check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    assert BACKEND in out and GGML_NAME[BACKEND] in out


def _report(key: str, rows: list[dict]) -> None:
    """Print ``rows`` and add them under ``key`` to the JSON file named by ``NAK_GPU_REPORT``."""
    print(json.dumps({key: rows}, indent=1))
    path = os.environ.get("NAK_GPU_REPORT")
    if path:
        old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        Path(path).write_text(json.dumps({**old, key: rows}, indent=1) + "\n")


def _generate(slices: list[Path], stage_args: list[list[str]]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt tokens, greedy tokens) for each of PROMPTS through a chain of ``slices``."""
    with LocalStages(slices, threads=2, ctx=CTX, max_sessions=2, stage_args=stage_args) as stages:
        with Chain(stages.addresses) as c:
            prompts = [c.tokenize(p) for p in PROMPTS]
            return prompts, [[t for t, _ in c.generate_tokens(p, N, GREEDY)] for p in prompts]


@gpu
def test_gpu_chain_equals_unsplit_model_on_the_gpu(smollm2_path: Path, tmp_path: Path) -> None:
    """Stages and the reference both offload every layer (the default, -1), each prompt is
    prefilled in one batch and decoded one token a step on both: the split's greedy tokens equal
    the unsplit model's on the GPU."""
    slices = cut(smollm2_path, CHAINS_SMOLLM2["3-stage"], tmp_path)
    prompts, got = _generate(slices, [GPU, GPU, GPU])
    ref = _nakshatra.Reference(str(smollm2_path), n_ctx=CTX)
    assert [len(g) for g in got] == [N] * len(PROMPTS)
    assert got == [ref.generate(p, N, temp=0.0) for p in prompts]


@gpu
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_gpu_hidden_state_at_each_cut_equals_the_unsplit_model(model: str, request: pytest.FixtureRequest,
                                                               tmp_path: Path) -> None:
    """The hidden state each GPU stage hands on equals, byte for byte, the unsplit model's output
    of that layer on the same GPU (read back from the device), every prefill and every decoded
    row. Patch 0004 made the decoded rows so: the last layer of a slice selected its output rows,
    which kept the GPU from fusing that layer as it does in the whole model (docs/gpu.md). Gemma 3
    adds its post-attention norm, QK norm and sliding window. The differences, if any, go to
    ``NAK_GPU_REPORT`` before the assertion."""
    path = request.getfixturevalue(f"{model}_path")
    slices = cut(path, (CHAINS_SMOLLM2 if model == "smollm2" else CHAINS_GEMMA3)["3-stage"], tmp_path)
    with LocalStages(slices, threads=2, ctx=CTX, max_sessions=2, stage_args=[GPU, GPU, GPU]) as stages:
        with Chain(stages.addresses) as c:
            n_embd = c.stages[0].n_embd
            prompt = c.tokenize(PROMPTS[0])
        tokens, hidden = chain_run(stages.addresses, prompt)
    bounds = sorted(hidden)
    report = []
    ref = _nakshatra.Reference(str(path), n_ctx=CTX, capture_layers=[b - 1 for b in bounds])
    assert tokens == ref.generate(prompt, len(tokens), temp=0.0) and len(tokens) > 1
    for b in bounds:
        want = np.frombuffer(ref.captured(b - 1), dtype=np.float32)
        have = np.frombuffer(hidden[b], dtype=np.float32)
        # every prefill row and every decoded row crossed the cut, in order (the reference does
        # not decode its last sampled token, a chain may: one row more)
        assert want.size == (len(prompt) + len(tokens) - 1) * n_embd
        assert have.size in (want.size, want.size + n_embd)
        want, have = want.reshape(-1, n_embd), have[:want.size].reshape(-1, n_embd)
        n = len(prompt)
        same = (have.view(np.uint32) == want.view(np.uint32)).all(axis=1)  # byte for byte, per row
        diff = np.abs(have - want).max(axis=1)
        rel = diff / np.abs(want).max(axis=1)  # against the row's largest value
        report.append({"backend": BACKEND, "model": model, "cut_after_layer": b - 1, "prefill_rows": n,
                       "prefill_rows_equal": int(same[:n].sum()), "decode_rows": len(same) - n,
                       "decode_rows_equal": int(same[n:].sum()), "max_abs_diff": float(diff.max()),
                       "max_rel_diff": float(rel.max())})
    _report(f"hidden_{model}", report)
    assert all(r["prefill_rows_equal"] == r["prefill_rows"] and r["decode_rows_equal"] == r["decode_rows"]
               for r in report), report


@gpu
def test_gpu_stage_alone_and_in_a_mixed_chain(smollm2_path: Path, tmp_path: Path) -> None:
    whole = cut(smollm2_path, CHAINS_SMOLLM2["1-stage"], tmp_path / "whole")
    prompts, alone = _generate(whole, [GPU])
    ref = _nakshatra.Reference(str(smollm2_path), n_ctx=CTX)  # every layer on the GPU
    assert [len(a) for a in alone] == [N] * len(PROMPTS)
    assert alone == [ref.generate(p, N, temp=0.0) for p in prompts]

    slices = cut(smollm2_path, CHAINS_SMOLLM2["3-stage"], tmp_path / "three")
    _, mixed = _generate(slices, [GPU, CPU, CPU])
    _, cpu = _generate(slices, [CPU, CPU, CPU])
    # the CPU stages of a GPU build are the CPU path: equal to the unsplit model with no GPU
    ref_cpu = _nakshatra.Reference(str(smollm2_path), n_ctx=CTX, devices="none")
    assert cpu == [ref_cpu.generate(p, N, temp=0.0) for p in prompts]
    report = []
    for p, m, c in zip(PROMPTS, mixed, cpu):
        first = next((i for i, (a, b) in enumerate(zip(m, c)) if a != b), None)
        report.append({"backend": BACKEND, "prompt": p, "tokens": len(m), "agree": sum(a == b for a, b in zip(m, c)),
                       "first_divergence": first})
    _report("mixed_vs_cpu", report)
    assert all(len(m) == N for m in mixed)
    assert [m[0] for m in mixed] == [c[0] for c in cpu], report
