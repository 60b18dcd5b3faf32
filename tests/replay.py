"""Replay a stage's batch log (``--batch-log``) through the unsplit model: what "the split chain
equals the unsplit model fed the same schedule of batches" is checked against.

Every logged batch is fed, in order, to ``Reference.decode_batch`` with the same rows (sequence
ids, positions, tokens); a row at a position its sequence already holds drops that position and
the ones after it first, as a stage does when a speculative window's rejected rows are rolled
back or a session is truncated. The acceptance rule of a speculative window is written again
here, not taken from the stage: sample the window's rows in order and go on while each row's
token is the next row's draft.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from nakshatra import _nakshatra


def greedy(logits, pos: int) -> int:
    """The greedy pick (llama.cpp's greedy sampler: the first maximum)."""
    return int(logits.argmax())


def replay(model: Path, log: Path, n_ctx: int, n_seq_max: int = 2,
           pick: Callable[[object, int], int] = greedy) -> dict[int, list[int]]:
    """Per session, the tokens the unsplit model yields for the logged batches: the token drawn
    from a sampled entry's last row, or from a window's rows in order while each draws the next
    row's draft. ``pick(logits, pos)`` draws the token for position ``pos``; ``n_ctx`` per sequence."""
    ref = _nakshatra.Reference(str(model), n_ctx=n_ctx * n_seq_max, n_seq_max=n_seq_max, n_threads=2)
    out: dict[int, list[int]] = defaultdict(list)
    for line in log.read_text().splitlines():
        batch = json.loads(line)
        seq, pos, tokens, sample = [], [], [], []
        for e in batch["entries"]:
            assert len(e["tokens"]) == e["n_tokens"]
            for i, t in enumerate(e["tokens"]):
                seq.append(e["seq"])
                pos.append(e["pos"] + i)
                tokens.append(t)
                sample.append(int(e["sample"] and (e["spec"] or i == e["n_tokens"] - 1)))
        ref.decode_batch(seq, pos, tokens, sample)
        logits = ref.last_logits()
        row = 0
        for e in batch["entries"]:
            if not e["sample"]:
                continue
            if not e["spec"]:
                out[e["session"]].append(pick(logits[row], e["pos"] + e["n_tokens"]))
                row += 1
                continue
            for i in range(e["n_tokens"]):
                tok = pick(logits[row + i], e["pos"] + i + 1)
                out[e["session"]].append(tok)
                if i + 1 == e["n_tokens"] or tok != e["tokens"][i + 1]:
                    break
            row += e["n_tokens"]
    return out


def sampling_session(log: Path) -> int:
    """The one session of ``log`` that sampled (a failover's replay runs under a temporary one
    that does not)."""
    sessions = {e["session"] for line in log.read_text().splitlines() for e in json.loads(line)["entries"]
                if e["sample"]}
    assert len(sessions) == 1, sessions
    return sessions.pop()
