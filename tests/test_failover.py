"""Replicas and failover with replay: a stage killed at a random step (SIGKILL, before or during
the step) hands its layer range to a replica, which is rebuilt by replaying the session's chunks
with the same batch boundaries; greedy output is identical to an uninterrupted run. With no replica
left the error names the dead stage and its layers, and the tokens made so far are kept.

Every trial checks that the stage died before the run ended and that its range moved. Relay and
forwarding kill from outside, before the step or during it (a timer the step waits for). A ring
runs ahead of its client, so a kill sent from outside may land after the ring has finished;
there the stage kills itself at the chosen step through the stages' testing hook
(``NAK_DEBUG_KILL_DIR``, cpp/stage/executor.cpp), before or after its llama_decode.

Every test runs on stages without a key and on stages holding a fresh cluster key (``key_file``):
the connections a chain opens after it is built (the probes that tell a dead stage from a slow
one, the switch to a replica) must authenticate as its first ones do."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from nakshatra import _nakshatra
from nakshatra.auth import ENV_VAR, generate_key_file
from nakshatra.client.chain import Chain, FailoverError, SamplerParams, parse_stage_address
from nakshatra.gguf.slicer import slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.local import LocalStages

pytestmark = pytest.mark.slow

GREEDY = SamplerParams(temp=0.0)
PROMPT = "The history of the Roman Empire"
N_PREDICT = 16
RANGES = [LayerRange(0, 9), LayerRange(9, 21), LayerRange(21, 30)]
TRIALS = 21  # 7 per path: relay, forwarding, ring


@pytest.fixture(scope="module")
def slices(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("smol-failover")
    m = slice_model(smollm2_path, RANGES, out_dir=out, progress=False)
    return [out / s.file for s in m.slices]


@pytest.fixture(params=["no-key", "key"])
def key_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    """None (stages without a key), or a fresh random cluster key in a file of mode 0600."""
    if request.param == "no-key":
        return None
    (tmp_path / "key").mkdir()
    generate_key_file(tmp_path / "key" / "cluster.key")
    return tmp_path / "key" / "cluster.key"


@pytest.fixture
def key(key_file: Path | None) -> bytes | None:
    """The 32 bytes in ``key_file`` (what a client passes as ``Chain(..., key=)``), or None."""
    return bytes.fromhex(key_file.read_text()) if key_file else None


def _nak_env() -> dict[str, str]:
    """The CLI's environment without $NAK_KEY: a key reaches it only through --key-file."""
    return {k: v for k, v in os.environ.items() if k != ENV_VAR}


class Pool:
    """Stage processes by address; ``spawn(i)`` starts one more stage for range ``i`` (holding
    the cluster key in ``key_file``, when given)."""

    def __init__(self, slices: list[Path], kill_dir: Path, key_file: Path | None = None) -> None:
        self.slices = slices
        self.kill_dir = kill_dir
        self.key_file = key_file
        self.groups: list[LocalStages] = []
        self.pid: dict[str, int] = {}
        self.range_of: dict[str, int] = {}
        self.proc: dict[str, object] = {}

    def spawn(self, *ranges: int, max_sessions: int = 4) -> None:
        ls = LocalStages([self.slices[i] for i in ranges], threads=1, ctx=256, max_sessions=max_sessions,
                         cpu_lock=False, env={"NAK_DEBUG_KILL_DIR": str(self.kill_dir)}, key_file=self.key_file)
        ls.start()
        self.groups.append(ls)
        for i, addr, pid, proc in zip(ranges, ls.addresses, ls.pids, ls.procs):
            self.pid[addr] = pid
            self.range_of[addr] = i
            self.proc[addr] = proc

    def kill(self, addr: str) -> None:
        os.kill(self.pid.pop(addr), signal.SIGKILL)
        del self.range_of[addr]

    def arm(self, addr: str, step: int, when: str) -> None:
        """Make the stage at ``addr`` SIGKILL itself at the first step >= ``step``, ``when`` =
        "before" or "after" its llama_decode (the stages' NAK_DEBUG_KILL_DIR hook)."""
        (self.kill_dir / str(self.pid[addr])).write_text(f"{step} {when}\n")

    def died_of_sigkill(self, addr: str) -> bool:
        """Whether the stage at ``addr`` has exited, killed by SIGKILL (it is then forgotten)."""
        proc = self.proc[addr]
        if proc.poll() != -signal.SIGKILL:
            return False
        self.pid.pop(addr, None)
        self.range_of.pop(addr, None)
        return True

    @property
    def addresses(self) -> list[str]:
        return list(self.pid)

    def close(self) -> None:
        for ls in self.groups:
            ls.stop()


@pytest.fixture
def pool(slices: list[Path], tmp_path: Path, key_file: Path | None):
    p = Pool(slices, tmp_path, key_file)
    try:
        yield p
    finally:
        p.close()


def _greedy(chain: Chain, prompt: list[int], kill_at: int = -1, kill=None, delay_s: float = 0.0,
            sampler: SamplerParams = GREEDY) -> list[int]:
    """N_PREDICT tokens (greedy unless ``sampler``), one feed per token; ``kill()`` runs before step
    ``kill_at`` (or ``delay_s`` after that step started, from another thread, so it lands during
    the step). A ring takes no ``kill``: arm the victim's hook (Pool.arm) instead."""
    if chain.ring_mode:
        assert kill is None, "a kill from outside may miss a ring: use Pool.arm"
        with chain.session(sampler, n_predict=N_PREDICT, ignore_eog=True) as sess:
            return [r["token"] for r in sess.ring(prompt, N_PREDICT)]
    with chain.session(sampler, ignore_eog=True) as sess:
        out = [sess.feed(prompt)["token"]]
        for step in range(1, N_PREDICT):
            timer = None
            if step == kill_at:
                if delay_s > 0:
                    timer = threading.Timer(delay_s, kill)
                    timer.start()
                else:
                    kill()
            out.append(sess.feed([out[-1]])["token"])
            if timer:
                timer.join()
        return out


def test_a_killed_stage_fails_over_to_a_replica_with_identical_output(pool: Pool, key: bytes | None) -> None:
    pool.spawn(0, 0, 1, 1, 2, 2)
    with Chain(pool.addresses, key=key) as c:
        prompt = c.tokenize(PROMPT)
        want = _greedy(c, prompt)
    rnd = random.Random(1234)
    for trial in range(TRIALS):
        mode = ("relay", "forwarding", "ring")[trial % 3]
        with Chain(pool.addresses, forwarding=mode != "relay", ring=mode == "ring", timeout_s=20, key=key) as c:
            assert [len(g) for g in c.replicas] == [2, 2, 2]
            r = rnd.randrange(len(RANGES))
            victim = c.stages[r].address
            step = rnd.randrange(1, N_PREDICT - 1)  # a kill that lands late still meets a later step
            delay = rnd.choice([0.0, 0.001, 0.004])
            what = f"trial {trial} ({mode}): killed {victim} (layers {RANGES[r]}) at step {step}"
            if mode == "ring":
                pool.arm(victim, step, "before" if delay == 0 else "after")
                got = _greedy(c, prompt)
                assert pool.died_of_sigkill(victim), f"{what}: the stage did not die"
            else:
                got = _greedy(c, prompt, step, lambda: pool.kill(victim), delay)
            assert got == want, what
            # the victim died before the run ended: its range moved to the replica mid-run
            assert c.stages[r].address != victim, f"{what}: no failover happened"
        pool.spawn(r)  # back to two stages per range


def test_seeded_sampling_survives_failover_unchanged(pool: Pool, key: bytes | None) -> None:
    """The draw is keyed to (seed, position) (cpp/stage/stage.h, nak_sampler_seed_at): a replica
    rebuilt by replay, and a surviving last stage that samples a step again after a ring restart,
    continue the uninterrupted run's seeded output token for token."""
    seeded = SamplerParams(temp=0.9, top_k=100, top_p=0.95, seed=4242)
    pool.spawn(0, 0, 1, 1, 2, 2)
    with Chain(pool.addresses, key=key) as c:
        prompt = c.tokenize(PROMPT)
        want = _greedy(c, prompt, sampler=seeded)
        other = _greedy(c, prompt, sampler=SamplerParams(temp=0.9, top_k=100, top_p=0.95, seed=4243))
    assert want != other, "the seed must matter for this test to mean anything"
    rnd = random.Random(99)
    for trial, (mode, r) in enumerate([("relay", 2), ("forwarding", 2), ("ring", 2), ("ring", 1), ("ring", 0),
                                       ("forwarding", 1)]):
        with Chain(pool.addresses, forwarding=mode != "relay", ring=mode == "ring", timeout_s=20, key=key) as c:
            victim = c.stages[r].address
            step = rnd.randrange(1, N_PREDICT - 2)
            delay = rnd.choice([0.0, 0.002])
            what = f"trial {trial} ({mode}): killed {victim} (layers {RANGES[r]}) at step {step}"
            if mode == "ring":
                pool.arm(victim, step, "before" if delay == 0 else "after")
                got = _greedy(c, prompt, sampler=seeded)
                assert pool.died_of_sigkill(victim), f"{what}: the stage did not die"
            else:
                got = _greedy(c, prompt, step, lambda: pool.kill(victim), delay, sampler=seeded)
            assert got == want, what
            assert c.stages[r].address != victim, f"{what}: no failover happened"
        pool.spawn(r)


def test_no_replica_left_names_the_stage_and_keeps_the_tokens(pool: Pool, key: bytes | None) -> None:
    pool.spawn(0, 1, 2)
    with Chain(pool.addresses, timeout_s=20, key=key) as c:
        prompt = c.tokenize(PROMPT)
        want = [t for t, _ in c.generate_tokens(prompt, N_PREDICT, GREEDY)]
        victim = c.stages[1].address
        got: list[int] = []
        with pytest.raises(FailoverError, match=re.escape(f"stage {victim} (layers {RANGES[1]})") + ".*no replica") as ei:
            for i, (tok, _) in enumerate(c.generate_tokens(prompt, N_PREDICT, GREEDY)):
                got.append(tok)
                if i == 5:
                    pool.kill(victim)
    assert ei.value.stage == victim and ei.value.layers == RANGES[1]
    assert ei.value.tokens == got == want[:len(got)] and len(got) == 6


def test_an_overloaded_stage_sends_the_session_to_a_replica(pool: Pool, key: bytes | None) -> None:
    pool.spawn(0, 0, max_sessions=1)
    pool.spawn(1, 2)
    with Chain(pool.addresses, key=key) as c:
        prompt = c.tokenize(PROMPT)
        want = _greedy(c, prompt)
        chosen = c.stages[0]
        # fill the chosen stage's only session slot from another client: it answers "overloaded"
        with Chain([chosen.address, *[a for a in pool.addresses if pool.range_of[a] != 0]], key=key) as hog:
            with hog.session(GREEDY):
                got = _greedy(c, prompt)
                assert c.stages[0].address != chosen.address
    assert got == want


def test_the_healthiest_replica_takes_over(pool: Pool, key: bytes | None) -> None:
    """A dead stage's range goes to the replica with the lowest health score among those that
    answer a fresh HELLO, not the first listed: of two idle-but-one, the idle one wins even where
    the address order (the tie-break) would pick the other."""
    pool.spawn(0, 1, 1, 1, 2)
    with Chain(pool.addresses, timeout_s=20, key=key) as c:
        prompt = c.tokenize(PROMPT)
        want = _greedy(c, prompt)
        serving = c.stages[1].address
        # equal scores go by address: `busy` would win the tie if its session did not count
        busy, idle = sorted(a for a in pool.addresses if pool.range_of[a] == 1 and a != serving)
        assert [r.address for r in c.replicas[1]] == [serving, busy, idle]
        host, port = parse_stage_address(busy)
        hog = _nakshatra.StageClient(host, port, key=key or b"")
        try:
            hog.hello()
            hog.open(7, temp=0.0)  # one session of its 4 slots taken: score 0.25 against 0
            got = _greedy(c, prompt, 5, lambda: pool.kill(serving))
        finally:
            hog.close()
        assert got == want
        assert c.stages[1].address == idle


def _nak_status(addrs: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nakshatra_cli", "status", "--chain", ",".join(addrs), *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=_nak_env())


def test_nak_status_shows_serving_replica_and_down_stages(pool: Pool, key_file: Path | None) -> None:
    pool.spawn(0, 0, 1, 2)
    gone = pool.addresses[1]
    pool.kill(gone)
    addrs = [*pool.addresses, gone]
    key_args = ["--key-file", str(key_file)] if key_file else []
    r = _nak_status(addrs, "--json", *key_args)
    assert r.returncode == 0, r.stderr
    rows = {row["address"]: row for row in json.loads(r.stdout)}
    assert rows[gone]["role"] == "down"
    assert sorted(row["role"] for a, row in rows.items() if a != gone) == ["serving"] * 3
    table = _nak_status(addrs, *key_args)
    assert table.returncode == 0 and "serving" in table.stdout and "down" in table.stdout
    if key_file:  # without the key every keyed stage refuses the HELLO
        r = _nak_status(addrs, "--json")
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert [row["role"] for row in rows] == ["down"] * 4
        assert all("cluster key" in row["error"] for row in rows if row["address"] != gone), rows


@pytest.mark.parametrize("key_file", ["key"], indirect=True)
def test_nak_api_streams_on_through_a_failover_with_a_key(pool: Pool, key_file: Path, key: bytes,
                                                         smollm2_path: Path) -> None:
    """The reported setup: the middle range on two replicas, every stage keyed, ``nak api
    --key-file``; the serving middle stage dies during a streamed completion. The stream goes on
    through the other replica, and its text equals the unsplit model's."""
    pool.spawn(0, 1, 1, 2)
    a, b = [x for x in pool.addresses if pool.range_of[x] == 1]
    n_tokens = 24
    with Chain(pool.addresses, key=key) as c:
        prompt = "1, 2, 3, 4, 5,"
        want = c.detokenize(_nakshatra.Reference(str(smollm2_path), n_ctx=256, n_threads=1)
                            .generate(c.tokenize(prompt), n_tokens))
    # a session held on `b` makes `a` the healthiest, so the server's chain serves the range with
    # `a`; `a` kills itself at the 8th step of the stream (the stages' testing hook)
    host, port = parse_stage_address(b)
    hog = _nakshatra.StageClient(host, port, key=key)
    hog.hello()
    hog.open(7, temp=0.0)
    pool.arm(a, 8, "before")
    p = subprocess.Popen([sys.executable, "-m", "nakshatra_cli", "api", "--chain", ",".join(pool.addresses),
                          "--key-file", str(key_file), "--port", "0", "--parallel", "1", "--model-id", "smollm2",
                          "--timeout", "20"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=_nak_env())
    try:
        url = p.stdout.readline().strip()
        assert url.startswith("http://"), f"nak api did not start: {url!r} {p.stderr.read() if p.poll() is not None else ''}"
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "stream": True}
        texts, errors, finish = [], [], None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    errors.append(d["error"])
                    continue
                for ch in d["choices"]:
                    texts.append(ch["text"])
                    finish = ch.get("finish_reason") or finish
        cluster = httpx.get(url + "/api/cluster", timeout=30).json()
    finally:
        hog.close()
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=20)
        p.stdout.close()
        p.stderr.close()
    assert pool.died_of_sigkill(a), "the serving replica did not die"
    assert not errors, errors
    assert "".join(texts) == want and finish == "length"
    roles = {s["address"]: s["role"] for s in cluster["stages"]}
    assert roles[a] == "down" and roles[b] == "serving", roles
