"""Speculative decoding around the chain: the last stage drafts with llama.cpp's n-gram drafter,
a window [sampled, drafts...] travels as one step, the last stage keeps the rows up to the first
draft its sampler disagrees with, and every other stage drops the rejected rows when the next step
arrives.

llama.cpp's kernels are not batch-invariant, so a window's rows may round differently from
one-token steps. What must hold exactly is that the chain equals the unsplit model fed the same
schedule of batches: the first stage logs every batch it decodes (``--batch-log``), and the
replay feeds those rows to the unsplit model (``Reference.decode_batch``, which drops a rolled-back
window's rows as the stages do), samples every row of a window and applies the acceptance rule
written again here. Greedy, seeded (checked by the independent sampler of ``seeded_rule.py``)
and through a failover in the middle of a window.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

import seeded_rule as rule
from nakshatra.client.chain import Chain, ChainError, SamplerParams
from nakshatra.gguf.slicer import slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.local import LocalStages
from replay import replay, sampling_session as _session_of

pytestmark = pytest.mark.slow

CTX = 512
N_PREDICT = 48
TEXT = ("Nakshatra runs one language model across the machines people already own: a gaming PC, "
        "a Mac, a laptop and a mini PC, each holding a range of the model's layers.")
# most of the answer follows the prompt: the drafter's ground
PROMPT = f"Copy the following text exactly.\n\nText: {TEXT}\n\nCopy: {TEXT[:40]}"
GREEDY = SamplerParams(temp=0.0)
PATHS = {"ring": dict(forwarding=True, ring=True), "forwarding": dict(forwarding=True),
         "relay": dict(forwarding=False)}


@pytest.fixture(scope="module")
def slices(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("smol-spec")
    m = slice_model(smollm2_path, [LayerRange(0, 9), LayerRange(9, 21), LayerRange(21, 30)], out_dir=out,
                    progress=False)
    return [out / s.file for s in m.slices]


def _run(addresses: list[str], path: str, sampler: SamplerParams, draft_max: int) -> tuple[list[int], object]:
    with Chain(addresses, draft_max=draft_max, **PATHS[path]) as c:
        sess = c.session(sampler, n_predict=N_PREDICT)
        try:
            toks = [t for t, _ in c.generate_tokens(c.tokenize(PROMPT), N_PREDICT, sampler, session=sess)]
        finally:
            sess.close()
    return toks, sess


@pytest.mark.parametrize("path", list(PATHS))
def test_greedy_speculation_equals_the_unsplit_model_fed_the_same_batches(
        smollm2_path: Path, slices: list[Path], tmp_path: Path, path: str) -> None:
    log = tmp_path / "batches.jsonl"
    # every stage decodes the same batches; the client relays to each stage alone, and only the
    # last one is told to sample: log there
    args = [[], [], ["--batch-log", str(log)]] if path == "relay" else [["--batch-log", str(log)]]
    with LocalStages(slices, threads=1, ctx=CTX, stage_args=args) as st:
        got, sess = _run(st.addresses, path, GREEDY, draft_max=8)
        stats = json.loads(Chain(st.addresses).clients[-1].stats())
    # speculation really happened, and paid: windows were verified and drafts accepted
    assert sess.spec_windows >= 3 and sess.spec_accepted >= 10, vars(sess)
    assert stats["spec_windows"] == sess.spec_windows and stats["spec_accepted"] == sess.spec_accepted
    entries = [e for line in log.read_text().splitlines() for e in json.loads(line)["entries"]]
    assert sum(e["spec"] for e in entries) == sess.spec_windows
    want = replay(smollm2_path, log, CTX)[_session_of(log)]
    # the chain does not yield an end-of-generation token; the replay draws it too
    assert want[:len(got)] == got
    assert len(want) - len(got) in (0, 1)
    assert len(got) >= 20


def test_seeded_speculation_follows_the_seeded_rule_on_the_same_batches(
        smollm2_path: Path, slices: list[Path], tmp_path: Path) -> None:
    """A draft is accepted exactly when it equals what the seeded sampler draws at its position:
    the independent sampler, fed the unsplit model's logits of the logged rows, picks every
    token the chain produced."""
    seed, temp, top_k, top_p, min_p = 4242, 0.3, 40, 0.95, 0.05
    sampler = SamplerParams(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    log = tmp_path / "batches.jsonl"
    with LocalStages(slices, threads=1, ctx=CTX, stage_args=[["--batch-log", str(log)]]) as st:
        got, sess = _run(st.addresses, "ring", sampler, draft_max=8)
    assert sess.spec_accepted >= 5, vars(sess)

    def pick(logits, pos: int) -> int:
        return rule.sample(logits, pos, seed, temp, top_k, top_p, min_p).token

    want = replay(smollm2_path, log, CTX, pick=pick)[_session_of(log)]
    assert want[:len(got)] == got
    # and the position keys the draw: drawing each row one position late picks otherwise
    late = replay(smollm2_path, log, CTX, pick=lambda logits, pos: pick(logits, pos + 1))[_session_of(log)]
    assert late[:len(got)] != got


def test_speculation_off_and_on_agree_and_stats_add_up(slices: list[Path]) -> None:
    """Greedy agreement with the run without speculation is measured, not assumed: on this
    prompt the two agree (docs/performance.md reports the agreement on the bench workloads)."""
    with LocalStages(slices, threads=1, ctx=CTX) as st:
        plain, _ = _run(st.addresses, "ring", GREEDY, draft_max=0)
        spec, sess = _run(st.addresses, "ring", GREEDY, draft_max=8)
    assert sess.spec_windows > 0
    assert 0 < sess.spec_accepted <= sess.spec_drafted
    first_diff = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), None)
    assert first_diff is None and len(plain) == len(spec), (first_diff, plain, spec)


def test_draft_max_out_of_range_is_refused_before_any_stage_sees_it(slices: list[Path]) -> None:
    with LocalStages(slices, threads=1, ctx=CTX) as st:
        with pytest.raises(ChainError, match="--draft-max 65 must be in 0..64"):
            Chain(st.addresses, draft_max=65)
        c = Chain(st.addresses)
        with pytest.raises(Exception, match="draft_max -1 out of range"):
            c.clients[0].open(99, draft_max=-1)
        # a window is the sampled token and at least one draft; a step may start inside the last
        # step only when that step was a window
        first = c.clients[0]
        first.open(7, temp=0.0)
        with pytest.raises(Exception, match="a speculative window holds the sampled token and at least one draft"):
            first.forward(7, 0, [0], tokens=[1], spec=True)
        first.forward(7, 0, [0, 1, 2], tokens=[1, 2, 3])
        with pytest.raises(Exception, match="does not continue the 3 cached positions"):
            first.forward(7, 1, [1], tokens=[5])
        first.forward(7, 1, [3, 4, 5], tokens=[4, 5, 6], spec=True)
        r = first.forward(7, 2, [4], tokens=[9])  # drops position 5 (and the draft at 4) first
        assert r["n_past"] == 5
        c.close()


@pytest.mark.parametrize("victim,when", [(1, "before"), (2, "after")], ids=["middle-before", "last-after"])
def test_failover_in_the_middle_of_a_window(smollm2_path: Path, slices: list[Path], tmp_path: Path,
                                            victim: int, when: str) -> None:
    """A stage dies at a step that is a speculative window (the middle one before its decode, the
    last one after it, the window's verdict never sent). Its replica is rebuilt by replaying the
    session's steps with the same windows and roll-backs, the ring starts again from the last
    token received, and the output still equals the unsplit model fed the first stage's logged
    batches (the replay's own batches included)."""
    kill_dir = tmp_path / "kill"
    kill_dir.mkdir()
    env = {"NAK_DEBUG_KILL_DIR": str(kill_dir)}
    logs = [tmp_path / "plain.jsonl", tmp_path / "failover.jsonl"]
    # first a run without a kill: which steps are windows (the schedule is the same up to the kill)
    with LocalStages(slices, threads=1, ctx=CTX, stage_args=[["--batch-log", str(logs[0])]]) as st:
        plain, _ = _run(st.addresses, "ring", GREEDY, draft_max=8)
    windows = [e["step"] for line in logs[0].read_text().splitlines() for e in json.loads(line)["entries"]
               if e["spec"]]
    assert len(windows) >= 3
    step = windows[len(windows) // 2]
    ranges = [0, 1, 1, 2, 2]
    with LocalStages([slices[i] for i in ranges], threads=1, ctx=CTX, env=env, cpu_lock=False,
                     stage_args=[["--batch-log", str(logs[1])]]) as st:
        c = Chain(st.addresses, forwarding=True, ring=True, draft_max=8, timeout_s=30)
        dead = c.stages[victim].address
        pid = st.pids[st.addresses.index(dead)]
        (kill_dir / str(pid)).write_text(f"{step} {when}\n")
        sess = c.session(GREEDY, n_predict=N_PREDICT)
        got = [t for t, _ in c.generate_tokens(c.tokenize(PROMPT), N_PREDICT, GREEDY, session=sess)]
        sess.close()
        proc = st.procs[st.addresses.index(dead)]
        assert proc.wait(timeout=10) == -signal.SIGKILL, "the stage did not die"
        assert c.stages[victim].address != dead, "no failover happened"
        c.close()
    want = replay(smollm2_path, logs[1], CTX)[_session_of(logs[1])]
    assert want[:len(got)] == got
    assert len(got) == len(plain)
    assert not os.path.exists(kill_dir / str(pid))
