"""Stages on separate hosts, for real: each stage in its own network namespace with its own address
(tests/netns.py), a cluster key, and the client on the "LAN" bridge. Relay, forwarding, ring and a
failover across them give the unsplit model's exact tokens; and the cluster workflow as a user
types it (nak plan writes the file, nak up on one host, the printed nak serve --fetch on the
others) runs across the hosts."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from nakshatra import _nakshatra
from nakshatra.auth import generate_key_file, load_key
from nakshatra.chain import Chain, SamplerParams
from nakshatra.errors import ChainError
from nakshatra.local import LocalStages
from netns import Hosts, require_netns
from test_upstream import cut

pytestmark = pytest.mark.slow

GREEDY = SamplerParams(temp=0.0)
PROMPT = "The history of the Roman Empire"
N = 16
CTX = 256


def _tokens(chain: Chain, prompt: list[int], before_step=None) -> list[int]:
    if chain.ring_mode:
        with chain.session(GREEDY, n_predict=N, ignore_eog=True) as s:
            return [r["token"] for r in s.ring(prompt, N)]
    with chain.session(GREEDY, ignore_eog=True) as s:
        out = [s.feed(prompt)["token"]]
        for i in range(1, N):
            if before_step:
                before_step(i)
            out.append(s.feed([out[-1]])["token"])
        return out


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
