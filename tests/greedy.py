"""Greedy generation for tests that interrupt a chain between steps."""

from __future__ import annotations

from collections.abc import Callable

from nakshatra.client.chain import Chain, SamplerParams

GREEDY = SamplerParams(temp=0.0)


def greedy_tokens(chain: Chain, prompt: list[int], n: int, before_step: Callable[[int], None] | None = None) -> list[int]:
    """``n`` greedy tokens (end-of-generation ignored), one feed per token; on a ring chain the
    ring's stream instead. ``before_step(i)`` runs before feed ``i`` (not on a ring, which runs
    ahead of its client: use the stages' NAK_DEBUG_KILL_DIR hook there)."""
    if chain.ring_mode:
        assert before_step is None, "a ring runs ahead of its client: use the stages' testing hook"
        with chain.session(GREEDY, n_predict=n, ignore_eog=True) as s:
            return [r["token"] for r in s.ring(prompt, n)]
    with chain.session(GREEDY, ignore_eog=True) as s:
        out = [s.feed(prompt)["token"]]
        for i in range(1, n):
            if before_step:
                before_step(i)
            out.append(s.feed([out[-1]])["token"])
        return out
