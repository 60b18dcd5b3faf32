"""``nak bench --swa``: the sliding-window KV the stages keep by default (the window plus one
ubatch per session, llama.cpp's own default) against ``nak serve --swa-full`` (the whole context,
what the stages kept before), side by side in one run.

Both chains run at once as local stages (they sleep when idle) with the same ``--ctx`` and
``--max-sessions``; every measurement alternates between them, repetition by repetition (which
goes first alternates too):

* **own memory**: the stages' anonymous resident bytes (health ``rss_anon_bytes``: weight copies,
  KV cache, buffers; llama.cpp clears the KV buffers at load, so they are resident from the start),
  summed over the stages, right after loading;
* **prefill**: a prompt of ``prompt_len`` tokens (longer than the window, so the window slides);
* **decode**: ``n_decode`` greedy steps after it, one feed per token, tokens/s;
* **short rollback**: drop the last 4 positions (as a rejected draft or a chat turn's changed tail
  would) and feed those 4 tokens again, ms;
* **long rollback**: drop everything after position ``prompt_len // 2`` (beyond what the window
  keeps) and feed one token, ms: with the window the stages refuse and the session is fed again
  from position 0 (``Session.refeeds``), with ``--swa-full`` it is one decode step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..client.chain import Chain, SamplerParams
from ..errors import NakError
from .side_by_side import _prompt, _stat

GREEDY = SamplerParams(temp=0.0)
SHORT_ROLLBACK = 4  # positions


def _own_bytes(chain: Chain) -> int:
    """Sum of the stages' anonymous resident bytes (health ``rss_anon_bytes``)."""
    return sum(int(c.hello()["health"].get("rss_anon_bytes", 0)) for c in chain.clients)


def _one_rep(chain: Chain, prompt: list[int], n_decode: int) -> dict[str, float]:
    """One repetition on one chain: prefill ms, decode tok/s, short and long rollback ms."""
    out: dict[str, float] = {}
    with chain.session(GREEDY, ignore_eog=True) as s:
        t0 = time.perf_counter()
        tok = s.feed(prompt)["token"]
        out["prefill_ms"] = (time.perf_counter() - t0) * 1e3
        fed: list[int] = []
        t0 = time.perf_counter()
        for _ in range(n_decode):
            fed.append(tok)
            tok = s.feed([tok])["token"]
        out["decode_tps"] = n_decode / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        s.truncate(s.n_past - SHORT_ROLLBACK)
        s.feed(fed[-SHORT_ROLLBACK:])
        out["short_rollback_ms"] = (time.perf_counter() - t0) * 1e3
        out["short_rollback_refeeds"] = s.refeeds
        t0 = time.perf_counter()
        s.truncate(len(prompt) // 2)
        s.feed([prompt[len(prompt) // 2]])
        out["long_rollback_ms"] = (time.perf_counter() - t0) * 1e3
        out["long_rollback_refeeds"] = s.refeeds - out["short_rollback_refeeds"]
    return out


def run_swa_bench(slices: Sequence[Path], *, ctx: int, max_sessions: int, prompt_len: int, n_decode: int,
                  reps: int, stage_threads: int = 0, status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure, per the module docstring, chains of ``slices`` with window KV and with
    ``--swa-full``. Returns ``{"config", "window", "full", "ratios"}``; ``window``/``full`` hold
    ``own_bytes`` (int, bytes) and per metric ``{"median", "spread", "n"}`` (ms or tokens/s).

    Raises NakError when the model has no sliding-window layers (nothing to compare) or the
    prompt does not fit ``ctx``."""
    from ..gguf.slicer import kv_value, scan_gguf
    from ..server.local import LocalStages

    reader = scan_gguf(slices[0])
    arch = kv_value(reader, "general.architecture")
    n_swa = int(kv_value(reader, f"{arch}.attention.sliding_window") or 0)
    if n_swa <= 0:
        raise NakError(f"--swa: {Path(slices[0]).name} ({arch}) has no sliding-window layers; "
                       "bench a model that has, e.g. --model gemma3-270m")
    if prompt_len + n_decode + 1 > ctx:
        raise NakError(f"--swa: a {prompt_len}-token prompt and {n_decode} decode steps do not fit --ctx {ctx}")
    say = status or (lambda text: None)
    common = dict(threads=stage_threads, ctx=ctx, max_sessions=max_sessions)
    with LocalStages(slices, **common) as win, LocalStages(slices, extra_args=["--swa-full"], **common) as full:
        with Chain(win.addresses, forwarding=True) as cw, Chain(full.addresses, forwarding=True) as cf:
            res: dict[str, Any] = {"window": {"own_bytes": _own_bytes(cw)}, "full": {"own_bytes": _own_bytes(cf)}}
            prompt = _prompt(prompt_len, cw.stages[0].n_vocab)
            runs: dict[str, list[dict[str, float]]] = {"window": [], "full": []}
            for rep in range(reps + 1):  # rep 0 warms both up
                # alternate which goes first, so neither always runs on a cache the other warmed
                order = (("window", cw), ("full", cf)) if rep % 2 else (("full", cf), ("window", cw))
                for name, chain in order:
                    say(f"{name} KV, repetition {rep}/{reps}")
                    r = _one_rep(chain, prompt, n_decode)
                    if rep:
                        runs[name].append(r)
    for name, rs in runs.items():
        for k in rs[0]:
            res[name][k] = _stat([r[k] for r in rs])
    w, f = res["window"], res["full"]
    res["ratios"] = {
        "own_memory_window_over_full": w["own_bytes"] / f["own_bytes"] if f["own_bytes"] else 0.0,
        **{f"{k}_window_over_full": w[k]["median"] / f[k]["median"]
           for k in ("prefill_ms", "decode_tps", "short_rollback_ms", "long_rollback_ms")}}
    res["config"] = {"slices": [str(p) for p in slices], "n_swa": n_swa, "ctx": ctx, "max_sessions": max_sessions,
                     "prompt_len": prompt_len, "n_decode": n_decode, "reps": reps}
    return res
