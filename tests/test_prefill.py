"""Pipelined prefill: a forwarding chain feeds a long prompt in micro-batches
(``Chain.prefill_chunk`` tokens) that flow through the stages in a pipeline: the first stage runs
chunk c+1 while the next runs chunk c, a bounded number in flight. By default the micro-batches
are n_ubatch (512) tokens, cut where llama.cpp cuts one n_batch chunk into ubatches: the output
equals the unsplit model fed the prompt in one piece (``Reference.generate``). Smaller ones with
short ends (``prefill_ramp``) equal the unsplit model fed the same micro-batches (the first
stage's batch log, replayed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nakshatra import _nakshatra
from nakshatra.client.chain import Chain, ChainError, SamplerParams
from nakshatra.gguf.slicer import slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.local import LocalStages
from replay import replay, sampling_session

pytestmark = pytest.mark.slow

CTX = 2048
N_PREDICT = 8
GREEDY = SamplerParams(temp=0.0)


@pytest.fixture(scope="module")
def slices(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("smol-prefill")
    m = slice_model(smollm2_path, [LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30)], out_dir=out,
                    progress=False)
    return [out / s.file for s in m.slices]


@pytest.fixture(scope="module")
def prompt(smollm2_path: Path) -> list[int]:
    ref = _nakshatra.Reference(str(smollm2_path), n_ctx=CTX, n_threads=2)
    text = " ".join(f"Item {i}: the {('red', 'green', 'blue')[i % 3]} box holds {i * 7 % 13} stones." for i in range(120))
    toks = ref.tokenize(text)
    assert 1300 < len(toks) < 1900, len(toks)  # three micro-batches and a part, one n_batch chunk
    return toks


@pytest.mark.parametrize("path", ["ring", "forwarding"])
def test_pipelined_prefill_equals_the_unsplit_model_fed_the_same_ubatches(
        smollm2_path: Path, slices: list[Path], prompt: list[int], tmp_path: Path, path: str) -> None:
    logs = [tmp_path / f"stage{i}.jsonl" for i in range(3)]
    with LocalStages(slices, threads=1, ctx=CTX, max_sessions=1, cpu_lock=False,
                     stage_args=[["--batch-log", str(p)] for p in logs]) as st:
        with Chain(st.addresses, forwarding=True, ring=path == "ring", prefill_chunk=256, prefill_ramp=True) as c:
            done: list[tuple[int, int]] = []
            got = [t for t, _ in c.generate_tokens(prompt, N_PREDICT, GREEDY,
                                                   on_prefill=lambda d, n: done.append((d, n)))]
    want = replay(smollm2_path, logs[0], CTX, n_seq_max=1)[sampling_session(logs[0])]
    assert got == want[:len(got)] and len(got) >= N_PREDICT - 1
    batches = [[json.loads(line) for line in p.read_text().splitlines()] for p in logs]
    # micro-batches of 256 tokens, 64 at either end, the same on every stage
    n = len(prompt)
    cuts = [64] + [256] * ((n - 128) // 256) + ([(n - 128) % 256] if (n - 128) % 256 else []) + [64]
    sizes = [[b["entries"][0]["n_tokens"] for b in stage[:len(cuts)]] for stage in batches]
    assert sizes[0] == cuts and sizes[0] == sizes[1] == sizes[2]
    # progress per micro-batch answered (a ring's last one answers with its first token)
    assert [d for d, _ in done[:3]] == [64, 320, 576]
    # and in a pipeline: the first stage started a chunk before the last stage had finished the
    # one before it (timestamps from one machine's steady clock)
    overlap = [c for c in range(1, len(cuts)) if batches[0][c]["t_start_us"] < batches[2][c - 1]["t_end_us"]]
    assert len(overlap) >= 2, [(b["t_start_us"], b["t_end_us"]) for stage in batches for b in stage[:len(cuts)]]


@pytest.mark.parametrize("path", ["ring", "forwarding"])
def test_default_micro_batches_equal_one_n_batch_chunk(smollm2_path: Path, slices: list[Path],
                                                       prompt: list[int], tmp_path: Path, path: str) -> None:
    """The default micro-batches are cut where llama.cpp cuts an n_batch chunk into ubatches
    (prefill_chunk = n_ubatch = 512): they build the same KV cache as one chunk, so the output
    equals the unsplit model fed the prompt in one piece, and the relayed chain's."""
    want = _nakshatra.Reference(str(smollm2_path), n_ctx=CTX, n_threads=2).generate(prompt, N_PREDICT)
    logs = [tmp_path / f"stage{i}.jsonl" for i in range(3)]
    with LocalStages(slices, threads=1, ctx=CTX, max_sessions=1, cpu_lock=False,
                     stage_args=[["--batch-log", str(p)] for p in logs]) as st:
        with Chain(st.addresses, forwarding=True, ring=path == "ring") as c:
            got = [t for t, _ in c.generate_tokens(prompt, N_PREDICT, GREEDY)]
    assert got == want[:len(got)] and len(got) >= N_PREDICT - 1
    batches = [[json.loads(line) for line in p.read_text().splitlines()] for p in logs]
    sizes = [b["entries"][0]["n_tokens"] for b in batches[0][:4]]
    assert sizes == [512, 512, 512, len(prompt) - 1536]
    overlap = [c for c in range(1, 4) if batches[0][c]["t_start_us"] < batches[2][c - 1]["t_end_us"]]
    assert overlap


def test_prefill_chunk_off_feeds_n_batch_chunks(slices: list[Path], prompt: list[int], tmp_path: Path) -> None:
    log = tmp_path / "stage0.jsonl"
    with LocalStages(slices, threads=1, ctx=CTX, max_sessions=1, stage_args=[["--batch-log", str(log)]]) as st:
        with Chain(st.addresses, ring=True, prefill_chunk=0) as c:
            list(c.generate_tokens(prompt, 2, GREEDY))
        with pytest.raises(ChainError, match="--prefill-chunk -1 must be >= 0"):
            Chain(st.addresses, prefill_chunk=-1)
    first = json.loads(log.read_text().splitlines()[0])
    assert first["entries"][0]["n_tokens"] == len(prompt)
