"""Continuous batching across sessions: the first stage decodes the pending steps of several
sessions in one llama_decode and the batch travels the chain unchanged. llama.cpp's kernels are
not batch-invariant, so a batched session may differ from the same session run alone; what must
hold is that the chain equals the unsplit model fed the same batches, which the first stage logs
(``--batch-log``). With batching off (``--max-batch 1``) every session equals its run alone."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from nakshatra import _nakshatra
from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.gguf.slicer import slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.local import LocalStages
from replay import replay as _replay

pytestmark = pytest.mark.slow

GREEDY = SamplerParams(temp=0.0)
PROMPTS = ["Once upon a time", "The sun is", "Write a list of fruits:", "In 1969, humans",
           "def fibonacci(n):", "The capital of France"]
CTX = 256
MAX_SESSIONS = 6
N_PREDICT = 20


@pytest.fixture(scope="module")
def smol_slices(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("smol-batch")
    m = slice_model(smollm2_path, [LayerRange(0, 9), LayerRange(9, 21), LayerRange(21, 30)], out_dir=out,
                    progress=False)
    return [out / s.file for s in m.slices]


def _run_concurrently(addresses: list[str], prompts: list[str], ring: bool) -> list[list[int]]:
    """Each prompt in its own session and thread, started together; the greedy tokens of each."""
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        try:
            with Chain(addresses, forwarding=True, ring=ring) as c:
                toks = c.tokenize(prompts[i])
                start.wait(timeout=60)
                results[i] = [t for t, _ in c.generate_tokens(toks, N_PREDICT, GREEDY)]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return [results[i] for i in range(len(prompts))]


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "forwarding"])
def test_batched_sessions_equal_the_unsplit_model_fed_the_same_batches(
        smollm2_path: Path, smol_slices: list[Path], tmp_path: Path, ring: bool) -> None:
    log = tmp_path / "batches.jsonl"
    with LocalStages(smol_slices, threads=1, ctx=CTX, max_sessions=MAX_SESSIONS,
                     stage_args=[["--batch-log", str(log)]]) as stages:
        chain_tokens = _run_concurrently(stages.addresses, PROMPTS, ring)
    batches = [json.loads(line) for line in log.read_text().splitlines()]
    # batching really happened: some llama_decode carried several sessions
    assert max(len(b["entries"]) for b in batches) >= 2
    replay = _replay(smollm2_path, log, CTX, n_seq_max=MAX_SESSIONS)
    # a session's first entry carries its prompt: that names which prompt each session ran
    ref = _nakshatra.Reference(str(smollm2_path), n_ctx=CTX, n_threads=1)
    prompt_of = {tuple(ref.tokenize(p)): i for i, p in enumerate(PROMPTS)}
    first = {}
    for b in batches:
        for e in b["entries"]:
            if e["session"] not in first:
                first[e["session"]] = prompt_of[tuple(e["tokens"])]
    assert sorted(first.values()) == list(range(len(PROMPTS)))
    for session, i in first.items():
        # the chain does not yield an end-of-generation token; the replay samples it too
        want = replay[session]
        assert want[:len(chain_tokens[i])] == chain_tokens[i], f"prompt {PROMPTS[i]!r}"
        assert len(want) - len(chain_tokens[i]) in (0, 1)


def test_batching_off_equals_each_session_alone(smollm2_path: Path, smol_slices: list[Path]) -> None:
    ref = _nakshatra.Reference(str(smollm2_path), n_ctx=CTX, n_threads=2)
    alone = [ref.generate(ref.tokenize(p), N_PREDICT) for p in PROMPTS[:4]]
    with LocalStages(smol_slices, threads=1, ctx=CTX, max_sessions=4,
                     stage_args=[["--max-batch", "1"]]) as stages:
        got = _run_concurrently(stages.addresses, PROMPTS[:4], ring=True)
    assert got == alone
