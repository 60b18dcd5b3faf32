"""Sliding-window KV that fits (issue 12, point 7).

Stages keep, for a model's sliding-window layers, only the window plus one ubatch of KV cells per
session (llama.cpp's own default) instead of the whole context (``nak serve --swa-full``). Gemma 3
270M (window 512, 15 of its 18 layers sliding) with n_ubatch 512: 1,024 cells per session for
those layers whatever ``--ctx`` is. What must keep working:

* a rollback of a few positions (speculation's rejected tokens, a chat turn's changed tail) needs
  nothing more: the cells it needs are still there;
* a rollback further back than the cache kept is refused by the stage (``window_lost``; at this
  llama.cpp commit ``seq_rm`` would report success and later output would be silently wrong) and
  the client feeds the session again from position 0 in its logged chunks, so the output equals a
  session fed the same chunks without any rollback;
* a failover after a long step: the stages that computed the failed step roll it back, which lies
  beyond their window, so the whole session is fed again and the text is the uninterrupted one.

Exactness against stock llama.cpp with both settings: tests/test_upstream.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.gguf.slicer import slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.local import LocalStages

pytestmark = pytest.mark.slow

GREEDY = SamplerParams(temp=0.0)
CTX = 3072  # per session: a long prompt, a second long turn and some tokens
RANGES = [(0, 3), (4, 10), (11, 17)]  # inclusive; cuts in the middle of the 6-layer window period
N = 6  # greedy tokens after each prefill


def turn(first: int, n: int) -> str:
    """A deterministic text of ``n`` numbered sentences (about 18 Gemma 3 tokens each)."""
    colours = ["red", "green", "blue", "amber", "violet"]
    return " ".join(f"Sentence {i}: the {colours[i % 5]} lantern number {i} hangs above door {i * 7 % 31}."
                    for i in range(first, first + n))


@pytest.fixture(scope="module")
def slices(gemma3_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("gemma3-swa")
    m = slice_model(gemma3_path, ranges=[LayerRange(a, b + 1) for a, b in RANGES], out_dir=out, progress=False)
    return [out / s.file for s in m.slices]


def greedy_after(sess, tokens: list[int], n: int = N) -> list[int]:
    """Feed ``tokens`` (one chunk), then ``n - 1`` greedy steps: the ``n`` tokens sampled."""
    out = [sess.feed(tokens)["token"]]
    while len(out) < n:
        out.append(sess.feed([out[-1]])["token"])
    return out


@pytest.fixture(scope="module")
def window_stages(slices: list[Path]):
    with LocalStages(slices, threads=2, ctx=CTX, max_sessions=1) as ls:
        yield ls


@pytest.mark.parametrize("forwarding", [False, True], ids=["relay", "forwarding"])
def test_short_rollback_keeps_the_window_and_long_rollback_feeds_again(window_stages: LocalStages,
                                                                      forwarding: bool) -> None:
    with Chain(window_stages.addresses, forwarding=forwarding) as c:
        prompt = c.tokenize(turn(1, 80), add_special=True, parse_special=False)
        assert len(prompt) > 1300  # almost three 512-token windows: the window cells were reused
        with c.session(GREEDY) as s:
            out = greedy_after(s, prompt)
            # drop the last 3 fed tokens, as a rejected draft would: the window is still there
            s.truncate(s.n_past - 3)
            assert s.refeeds == 0
            again = [s.feed([out[-4]])["token"]]
            while len(again) < 3:
                again.append(s.feed([again[-1]])["token"])
            assert again == out[-3:]
            # back into the prompt, far past what 1,024 cells keep: the stages refuse, the
            # client feeds the kept 700 tokens again
            s.truncate(700)
            assert s.refeeds == 1 and s.n_past == 700
            rolled = greedy_after(s, prompt[700:])
        # what a session fed the same chunks, without any rollback, generates
        with c.session(GREEDY) as fresh:
            fresh.feed(prompt[:700], sample=False)
            want = greedy_after(fresh, prompt[700:])
            assert fresh.refeeds == 0
    assert rolled == want
    assert want[0] == out[0]  # the same continuation of the prompt (a clear-cut first token)


def test_swa_full_rolls_back_anywhere_without_feeding_again(slices: list[Path]) -> None:
    with LocalStages(slices, threads=2, ctx=CTX, max_sessions=1, extra_args=["--swa-full"]) as ls:
        with Chain(ls.addresses) as c:
            prompt = c.tokenize(turn(1, 80), add_special=True, parse_special=False)
            with c.session(GREEDY) as s:
                greedy_after(s, prompt)
                s.truncate(700)
                assert s.refeeds == 0
                rolled = greedy_after(s, prompt[700:])
            with c.session(GREEDY) as fresh:
                fresh.feed(prompt[:700], sample=False)
                assert greedy_after(fresh, prompt[700:]) == rolled


def test_failover_after_a_long_step_feeds_the_session_again(slices: list[Path], tmp_path: Path) -> None:
    """The middle stage dies before a 1,000-token second turn: the first stage has computed that
    step, rolls it back (beyond its window: window_lost) and the session is fed again; the replica
    is built by replay. The tokens are those of the uninterrupted run."""
    env = {"NAK_DEBUG_KILL_DIR": str(tmp_path)}
    # two sessions: a replay runs the logged chunks through the stages before under a temporary one
    with LocalStages(slices + [slices[1]], threads=1, ctx=CTX, max_sessions=2, env=env) as ls:
        a, b, c3, b2 = ls.addresses
        with Chain([a, b, c3, b2], timeout_s=60) as c:
            first = c.tokenize(turn(1, 80), add_special=True, parse_special=False)
            second = c.tokenize(" " + turn(300, 55), add_special=False, parse_special=False)
            assert len(second) > 900
            with c.session(GREEDY) as s:
                want = [greedy_after(s, first, 1), greedy_after(s, second)]
                assert s.refeeds == 0
            with c.session(GREEDY) as s:
                got = [greedy_after(s, first, 1)]
                # the middle stage serving now SIGKILLs itself before its next decode (the long turn)
                serving = c.stages[1].address
                (tmp_path / str(ls.pids[ls.addresses.index(serving)])).write_text(f"{s.step} before\n")
                got.append(greedy_after(s, second))
                assert s.refeeds == 1
                assert c.stages[1].address != serving
        assert ls.procs[ls.addresses.index(serving)].wait(timeout=10) == -9  # it died of the hook's SIGKILL
    assert got == want


def test_nak_bench_swa_measures_both_side_by_side(gemma3_path: Path, smollm2_path: Path, tmp_path: Path) -> None:
    """`nak bench --swa`: the window KV holds less of the stages' own memory than --swa-full,
    a short rollback feeds nothing again in either, and a rollback to the middle of a 1,100-token
    prompt (beyond the 1,024 cells kept) feeds the session again only with the window."""
    import json
    import subprocess
    import sys

    out = tmp_path / "swa.json"
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "bench", "--swa", "--model", str(gemma3_path),
                        "--stages", "2", "--reps", "1", "--n-decode", "4", "--prompt-lens", "1100",
                        "--json", str(out)], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    w, f = res["window"], res["full"]
    assert 0 < w["own_bytes"] < f["own_bytes"]
    assert (w["short_rollback_refeeds"]["median"], w["long_rollback_refeeds"]["median"]) == (0, 1)
    assert (f["short_rollback_refeeds"]["median"], f["long_rollback_refeeds"]["median"]) == (0, 0)
    assert "--swa-full" in r.stdout and "own memory" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "nakshatra_cli", "bench", "--swa", "--model", str(smollm2_path),
                          "--stages", "2"], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert bad.returncode == 1 and "no sliding-window layers" in bad.stderr


@pytest.mark.parametrize("swa_full", [False, True], ids=["window-kv", "swa-full"])
def test_inspect_counts_the_kv_llama_cpp_allocates(slices: list[Path], swa_full: bool) -> None:
    """`nak inspect` (and `nak plan`, which uses the same per-layer figures) counts each slice's KV
    as llama.cpp allocates it for the stage, in both settings: llama.cpp's own no_alloc estimate
    with the stage's exact context parameters (nakshatra.gguf.memory.llama_estimate)."""
    from nakshatra.gguf.inspection import inspect_gguf
    from nakshatra.gguf.memory import llama_estimate

    kv = []
    for path in slices:
        info = inspect_gguf(path, n_ctx=4096, max_sessions=2, swa_full=swa_full)
        est = llama_estimate(path, 4096, 2, swa_full=swa_full)
        assert info["kv_bytes"] == sum(b["context"] for b in est["buffers"]), path.name
        kv.append(info["kv_bytes"])
    # Gemma 3 270M: one KV head of 256, f16 K and V: 1 KiB per layer and cell; 15 of 18 layers
    # slide over 512 tokens: 1,024 cells each per session with the window, 4,096 with --swa-full
    assert sum(kv) == 2 * 1024 * (3 * 4096 + 15 * (4096 if swa_full else 1024))
