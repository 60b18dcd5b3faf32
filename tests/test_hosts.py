"""Stages on separate hosts, for real: each stage in its own network namespace with its own address
(tests/netns.py), a cluster key, and the client on the "LAN" bridge. Relay, forwarding, ring and a
failover across them give the unsplit model's exact tokens; and the cluster workflow as a user
types it (nak plan writes the file, nak up on one host, the printed nak serve --fetch on the
others) runs across the hosts."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from greedy import greedy_tokens
from nakshatra import _nakshatra
from nakshatra.auth import generate_key_file, load_key
from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.cluster.config import load_cluster
from nakshatra.errors import ChainError
from nakshatra.server.local import LocalStages
from netns import Hosts, require_netns
from test_upstream import cut

pytestmark = pytest.mark.slow

GREEDY = SamplerParams(temp=0.0)
PROMPT = "The history of the Roman Empire"
N = 16
CTX = 256


def _tokens(chain: Chain, prompt: list[int], before_step=None) -> list[int]:
    return greedy_tokens(chain, prompt, N, before_step)


def test_relay_forwarding_ring_and_failover_across_hosts(smollm2_path: Path, tmp_path: Path) -> None:
    require_netns()
    s0, s1, s2 = cut(smollm2_path, [(0, 8), (9, 20), (21, 29)], tmp_path)
    key_file = tmp_path / "cluster.key"
    generate_key_file(key_file)
    key = load_key(key_file)
    with Hosts(4) as h:
        stages = LocalStages([s0, s1, s1, s2], threads=1, ctx=CTX, max_sessions=4, cpu_lock=False,
                             key_file=key_file, hosts=h.hosts, wrap=[h.wrap(i) for i in range(4)])
        try:
            stages.start()
            assert [a.rsplit(":", 1)[0] for a in stages.addresses] == h.hosts
            ref = _nakshatra.Reference(str(smollm2_path), n_ctx=CTX)
            with Chain(stages.addresses, key=key) as c:
                prompt = c.tokenize(PROMPT)
            ref_tokens = list(ref.generate(prompt, N, temp=0.0))  # stops before an end-of-generation token
            assert len(ref_tokens) >= 8
            for mode in ("relay", "forwarding", "ring"):
                with Chain(stages.addresses, key=key, forwarding=mode != "relay", ring=mode == "ring") as c:
                    # every hop crosses hosts: the stages' own addresses, none of them loopback
                    assert all(not _nakshatra.is_loopback(st.host) for st in c.stages)
                    assert _tokens(c, prompt)[:len(ref_tokens)] == ref_tokens, mode
            with Chain(stages.addresses, key=key, forwarding=True, timeout_s=10) as c:
                victim = c.stages[1].address
                pid = stages.pids[stages.addresses.index(victim)]

                def kill(i: int) -> None:
                    if i == 5:
                        os.kill(pid, signal.SIGKILL)

                assert _tokens(c, prompt, before_step=kill)[:len(ref_tokens)] == ref_tokens
                assert c.stages[1].address != victim, "no failover happened"
            with pytest.raises(ChainError, match="unauthorized|key"):
                Chain(stages.addresses)  # no key: every host refuses
        finally:
            stages.stop()


def _nak(*args: str, wrap: list[str] | None = None, cwd: Path | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as a user types it, on an emulated host (``wrap``) or here."""
    return subprocess.run([*(wrap or []), sys.executable, "-m", "nakshatra_cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd,
                          env={**os.environ, "COLUMNS": "1000"})


def test_plan_up_and_printed_serve_commands_across_hosts(smollm2_path: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`nak plan` writes the cluster file for three hosts, `nak up` on the first starts its stage
    and prints a `nak serve --fetch` command for each other host, which runs there from an empty
    folder (fetching its slice from the first host); the chain then gives the unsplit model's
    tokens from this machine, and `nak down` stops what `nak up` started."""
    require_netns()
    monkeypatch.setenv("NAKSHATRA_CACHE_DIR", str(tmp_path / "cache"))  # nak up's state and logs
    key_file = tmp_path / "cluster.key"
    generate_key_file(key_file)
    remote: list[subprocess.Popen] = []
    with Hosts(3) as h:
        # 118 MiB each: two hosts cannot hold SmolLM2's predicted stages at this context (about
        # 244 MiB in two), three can: the plan must use every host
        spec = [f"--host=h{i}={a},mem=118,speed=1000,link=0.5" for i, a in enumerate(h.hosts)]
        r = _nak("plan", str(smollm2_path), *spec, "--ctx", str(CTX), "--max-sessions", "2", "--mode", "ring",
                 "--key-file", str(key_file), "-o", str(tmp_path / "cluster.toml"))
        assert r.returncode == 0, r.stderr
        cf = load_cluster(tmp_path / "cluster.toml")
        assert sorted(s.host for s in cf.stages) == sorted(h.hosts), "the plan must use all three hosts"
        first = h.hosts.index(cf.stages[0].host)
        try:
            r = _nak("up", str(tmp_path / "cluster.toml"), wrap=h.wrap(first), cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            cmds = [ln for ln in r.stdout.splitlines() if ln.startswith("nak serve")]
            assert len(cmds) == 2, r.stdout
            for cmd in cmds:
                argv = shlex.split(cmd)
                host = argv[argv.index("--host") + 1]
                assert f"--fetch http://{cf.stages[0].host}:" in cmd and host in h.hosts and host != h.hosts[first]
                where = tmp_path / f"host-{host}"
                where.mkdir()
                # as `nak up` says: the key goes to each host first, over a secure channel (never served)
                assert "copy the cluster key" in r.stdout + r.stderr
                key_arg = argv[argv.index("--key-file") + 1]
                (where / key_arg).parent.mkdir(parents=True, exist_ok=True)
                (where / key_arg).write_bytes(key_file.read_bytes())
                (where / key_arg).chmod(0o600)
                with open(where / "serve.log", "wb") as log:
                    remote.append(subprocess.Popen([*h.wrap(h.hosts.index(host)), sys.executable, "-m",
                                                    "nakshatra_cli", *argv[1:]], cwd=where, stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL, stderr=log))
            deadline = time.monotonic() + 120
            while True:
                s = _nak("status", str(tmp_path / "cluster.toml"), "--json", timeout=60)
                assert s.returncode == 0, s.stderr
                rows = json.loads(s.stdout)
                if all(row["up"] for row in rows) or time.monotonic() > deadline or \
                        any(p.poll() is not None for p in remote):
                    break
                time.sleep(0.5)
            logs = [(tmp_path / f"host-{a}" / "serve.log") for a in h.hosts if (tmp_path / f"host-{a}").exists()]
            assert all(row["up"] for row in rows), (rows, [p.read_text()[-1500:] for p in logs])
            with Chain(cf.addresses(), key=load_key(key_file), ring=True) as c:
                prompt = c.tokenize(PROMPT)
                got = _tokens(c, prompt)
            want = list(_nakshatra.Reference(str(smollm2_path), n_ctx=CTX).generate(prompt, N, temp=0.0))
            assert len(want) >= 8 and got[:len(want)] == want
        finally:
            d = _nak("down", str(tmp_path / "cluster.toml"), wrap=h.wrap(first), cwd=tmp_path)
            for p in remote:
                p.terminate()
                p.wait(timeout=30)
        assert d.returncode == 0, d.stderr
