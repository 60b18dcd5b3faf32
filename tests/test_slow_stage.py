"""A slow stage is not a dead stage; a hung or stopped one is.

A stage computes on its own thread while its network thread answers HELLO and sends the waiting
client PROGRESS frames as llama_decode advances (cpp/stage/server.cpp). So:

- a stage held to a few percent of one CPU (a cgroup v1 cpu quota: a weak host) finishes a
  prefill that takes several times the client's ``timeout_s``, with the same text as unthrottled
  and no failover, and answers HELLO (busy) while it computes;
- a stage whose computation hangs while its network side still answers (the stages' testing hook
  ``NAK_DEBUG_KILL_DIR`` with ``STEP hang``), and a stage stopped with SIGSTOP, are both failed
  over to their replicas within the timeout, with the exact text of an uninterrupted run;
- a stage connecting to an unreachable next stage goes on answering meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from greedy import greedy_tokens
from hostemu import CpuQuota, require_cgroup_cpu
from nakshatra import _nakshatra
from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.errors import StageError
from nakshatra.server.local import LocalStages
from test_upstream import cut, long_prompt

pytestmark = pytest.mark.slow

GREEDY = SamplerParams(temp=0.0)
TIMEOUT_S = 5.0
N_PREDICT = 12
SMOL_RANGES = [(0, 8), (9, 20), (21, 29)]  # inclusive


@pytest.fixture(scope="module")
def smol_slices(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return cut(smollm2_path, SMOL_RANGES, tmp_path_factory.mktemp("smol-slow"))


def _tokens(chain: Chain, prompt: list[int], n: int = N_PREDICT, before_step=None) -> list[int]:
    return greedy_tokens(chain, prompt, n, before_step)


def _stats(address: str) -> dict:
    host, port = address.rsplit(":", 1)
    c = _nakshatra.StageClient(host, int(port), timeout_ms=10_000)
    try:
        c.hello()
        return json.loads(c.stats())
    finally:
        c.close()


@pytest.mark.parametrize("mode", ["relay", "forwarding"])
def test_a_throttled_stage_finishes_a_long_prefill_without_failover(gemma3_path: Path, tmp_path: Path,
                                                                    mode: str) -> None:
    require_cgroup_cpu()
    slices = cut(gemma3_path, [(0, 4), (5, 10), (11, 17)], tmp_path)
    # the middle range twice: a failover would have somewhere to go, and must not happen
    with LocalStages([slices[0], slices[1], slices[1], slices[2]], threads=1, ctx=1024, max_sessions=2,
                     cpu_lock=False) as ls:
        slow, spare = ls.addresses[1], ls.addresses[2]
        with Chain([a for a in ls.addresses if a != spare], timeout_s=TIMEOUT_S,
                   forwarding=mode == "forwarding") as c:
            prompt = c.tokenize(long_prompt(38))
            assert 600 < len(prompt) < 1000
            before = _stats(slow)["compute_us"]
            want = [t for t, _ in c.generate_tokens(prompt, 3, GREEDY)]
            busy_s = (_stats(slow)["compute_us"] - before) / 1e6
        # a quota that stretches the slow stage's share of the prefill to about 4 timeouts
        share = min(0.5, max(0.01, busy_s / (4 * TIMEOUT_S)))
        host, port = spare.rsplit(":", 1)
        hog = _nakshatra.StageClient(host, int(port), timeout_ms=10_000)  # a session on the spare:
        hog.hello()                                                     # the throttled stage is healthier
        hog.open(99, temp=0.0)
        with CpuQuota(share) as q, Chain(ls.addresses, timeout_s=TIMEOUT_S, forwarding=mode == "forwarding") as c:
            q.add(ls.pids[1])
            assert c.stages[1].address == slow
            seen: list[dict] = []
            done = threading.Event()

            def watch() -> None:  # HELLO while it computes, as a health probe would
                while not done.is_set():
                    host, port = slow.rsplit(":", 1)
                    try:
                        h = _nakshatra.StageClient(host, int(port), timeout_ms=int(TIMEOUT_S * 1000))
                        seen.append(h.hello()["health"])
                        h.close()
                    except Exception as e:  # noqa: BLE001 - recorded, asserted below
                        seen.append({"error": str(e)})
                    done.wait(0.5)

            t = threading.Thread(target=watch)
            t.start()
            try:
                got = [tok for tok, _ in c.generate_tokens(prompt, 3, GREEDY)]
            finally:
                done.set()
                t.join()
            assert got == want
            assert c.stages[1].address == slow, "the slow stage was failed over"
            assert _stats(spare)["tokens_in"] == 0, "the replica computed: a failover happened"
            assert q.throttled_us() > 0
        hog.close()
        errors = [h for h in seen if "error" in h]
        assert not errors, f"the slow stage did not answer HELLO while computing: {errors[:3]}"
        # the setup did what it says: the stage computed one request for longer than the client's
        # timeout (by its own report), and answered HELLO meanwhile
        assert any(h["busy_ms"] > TIMEOUT_S * 1000 for h in seen), \
            "no HELLO showed a computation longer than the timeout: the quota did not slow it enough"
        assert all(h["stalled_ms"] < TIMEOUT_S * 1000 / 2 for h in seen)


class _Stages:
    """SmolLM2 in 3 ranges, the middle one on two stages (with the testing hook armed-able)."""

    def __init__(self, slices: list[Path], hook_dir: Path) -> None:
        self.hook_dir = hook_dir
        self.ls = LocalStages([slices[0], slices[1], slices[1], slices[2]], threads=1, ctx=256, max_sessions=4,
                              cpu_lock=False, env={"NAK_DEBUG_KILL_DIR": str(hook_dir)})
        self.ls.start()

    def pid(self, address: str) -> int:
        return self.ls.pids[self.ls.addresses.index(address)]


@pytest.fixture
def stages(smol_slices: list[Path], tmp_path: Path):
    s = _Stages(smol_slices, tmp_path)
    try:
        yield s
    finally:
        for p in s.ls.procs:  # a SIGSTOPped stage would sit out SIGTERM's grace period
            try:
                os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        s.ls.stop()


@pytest.mark.parametrize("mode", ["relay", "forwarding", "ring"])
def test_a_hung_computation_fails_over_within_the_timeout(stages: _Stages, mode: str) -> None:
    with Chain(stages.ls.addresses) as c:
        want = _tokens(c, c.tokenize("The history of the Roman Empire"))
    with Chain(stages.ls.addresses, timeout_s=TIMEOUT_S, forwarding=mode != "relay", ring=mode == "ring") as c:
        prompt = c.tokenize("The history of the Roman Empire")
        victim = c.stages[1].address
        (stages.hook_dir / str(stages.pid(victim))).write_text("5 hang\n")
        got = _tokens(c, prompt)
        assert got == want
        assert c.stages[1].address != victim, "no failover happened"
        # the hung stage's network side still answers: it says it is busy and not advancing
        host, port = victim.rsplit(":", 1)
        h = _nakshatra.StageClient(host, int(port), timeout_ms=2000)
        health = h.hello()["health"]
        h.close()
        assert health["busy_ms"] > 0 and health["stalled_ms"] >= TIMEOUT_S * 1000 / 2, health


@pytest.mark.parametrize("mode", ["relay", "forwarding"])
def test_a_stopped_stage_fails_over_within_the_timeout(stages: _Stages, mode: str) -> None:
    with Chain(stages.ls.addresses) as c:
        want = _tokens(c, c.tokenize("The history of the Roman Empire"))
    with Chain(stages.ls.addresses, timeout_s=TIMEOUT_S, forwarding=mode == "forwarding") as c:
        prompt = c.tokenize("The history of the Roman Empire")
        victim = c.stages[1].address
        stopped = []

        def stop(i: int) -> None:
            if i == 5:
                os.kill(stages.pid(victim), signal.SIGSTOP)
                stopped.append(i)

        got = _tokens(c, prompt, before_step=stop)
        assert stopped and got == want
        assert c.stages[1].address != victim, "no failover happened"


def test_connecting_to_an_unreachable_next_stage_does_not_block_the_stage(smol_slices: list[Path]) -> None:
    """A listener whose accept queue is full drops SYNs: connecting to it hangs (until the
    stage's 5 s connect timeout). The stage must answer another client meanwhile, and then tell
    the step's owner that the next stage is unreachable."""
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(0)
    fillers = []
    for _ in range(4):  # fill the accept queue (backlog 0 still takes one or two)
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(sink.getsockname())
        fillers.append(f)
    time.sleep(0.2)
    blackhole = f"127.0.0.1:{sink.getsockname()[1]}"
    try:
        with LocalStages(smol_slices[:1], threads=1, ctx=256, max_sessions=2, cpu_lock=False) as ls:
            host, port = ls.addresses[0].rsplit(":", 1)
            owner = _nakshatra.StageClient(host, int(port), timeout_ms=20_000)
            owner.hello()
            owner.open(7, temp=0.0)
            owner.send_forward(7, 0, [0, 1, 2], [1, 2, 3], False, blackhole, "")
            # another client, after the step: answered while the connect hangs (a stage that
            # waited for it would answer after its 5 s connect timeout, past this 2 s one)
            other = _nakshatra.StageClient(host, int(port), timeout_ms=2000)
            assert other.hello()["layer_start"] == 0
            other.close()
            with pytest.raises(StageError, match="unreachable"):
                _nakshatra.wait_forward_ok([owner], 20_000, owner.last_request_id)
            owner.close()
    finally:
        for f in fillers:
            f.close()
        sink.close()


def test_bench_hosts_gives_the_slow_host_fewer_layers(smollm2_path: Path, tmp_path: Path) -> None:
    """`nak bench --hosts`: the probe, run inside each emulated host's CPU quota, measures the
    slow host slower (its windows span several quota periods, so the quota cannot hide in one
    burst), the plan gives it fewer layers, and both chains are measured side by side. (Which
    chain is faster is the benchmark's figure, in docs/performance.md, not this test's.)"""
    require_cgroup_cpu()
    out = tmp_path / "hosts.json"
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "bench", "--model", str(smollm2_path),
                        "--hosts", "fast=1.0,slow=0.2", "--reps", "1", "--n-decode", "8", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    fast, slow = res["hosts"]
    assert (fast["name"], slow["name"]) == ("fast", "slow")
    assert slow["layers_per_s"] < 0.6 * fast["layers_per_s"], res["hosts"]
    assert 0 < slow["planned_layers"] < fast["planned_layers"], res["hosts"]
    assert res["planned"]["decode_tps"]["median"] > 0 and res["even"]["decode_tps"]["median"] > 0
    assert "planned" in r.stdout and "even split" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "nakshatra_cli", "bench", "--hosts", "fast=2"], capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert bad.returncode == 1 and "SHARE" in bad.stderr
