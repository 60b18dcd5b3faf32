"""The chain over links and under load (parts of ``nak bench``): many sessions decoding at once,
stages behind emulated slow links (:mod:`.linkdelay`), the wire formats of the hidden state,
speculative decoding on the two fixed workloads (:mod:`.workloads`), and pipelined prefill.
Every figure is measured side by side in one run and reported as a ratio, as in
:mod:`.side_by_side` (whose definitions hold here too).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..client.chain import Chain
from ..errors import StageError
from .side_by_side import GREEDY, _prompt, _session_stats, _stat

SESSION_PROMPT = 32  # prompt tokens of each session in decode_sessions


def decode_sessions(addresses: list[str], n_sessions: int, n_decode: int, mode: str = "ring",
                    prompt_len: int = SESSION_PROMPT, hop_addresses: dict[str, str] | None = None,
                    timeout_s: float = 300.0) -> dict[str, float]:
    """``n_sessions`` sessions decoding at once, each from its own thread and connections, greedy,
    end-of-generation ignored. ``mode``: ``relay`` (client relays every hidden state),
    ``forwarding`` (stage to stage, one client round trip per token) or ``ring`` (the last stage
    starts each next step itself).

    Returns ``aggregate_tps`` (decoded tokens of all sessions / the wall time from the first
    session's first token to the last session's last token), ``ms_per_token`` (median over
    sessions of each one's decode time per token) and ``tokens``. Raises the first session's error.
    """
    import threading

    timings: dict[int, tuple[float, float, int]] = {}
    errors: list[BaseException] = []
    ready = threading.Barrier(n_sessions)

    def worker(i: int) -> None:
        try:
            with Chain(addresses, forwarding=mode != "relay", ring=mode == "ring", hop_addresses=hop_addresses,
                       timeout_s=timeout_s) as c:
                prompt = _prompt(prompt_len, c.stages[0].n_vocab)
                prompt[0] = (prompt[0] + 97 * i) % c.stages[0].n_vocab  # a different prompt per session
                with c.session(GREEDY, n_predict=n_decode + 1, ignore_eog=True) as sess:
                    ready.wait(timeout=timeout_s)
                    replies = sess.ring(prompt, n_decode + 1) if mode == "ring" else sess.relay(prompt, n_decode + 1)
                    t_first = t_last = 0.0
                    n = 0
                    for _ in replies:
                        t_last = time.perf_counter()
                        if n == 0:
                            t_first = t_last
                        n += 1
                    timings[i] = (t_first, t_last, n - 1)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    if errors:
        raise errors[0]
    if len(timings) != n_sessions:
        raise StageError(f"{n_sessions - len(timings)} of {n_sessions} sessions did not finish in {timeout_s:.0f} s")
    t0 = min(v[0] for v in timings.values())
    t1 = max(v[1] for v in timings.values())
    tokens = sum(v[2] for v in timings.values())
    per = [(v[1] - v[0]) * 1e3 / v[2] for v in timings.values() if v[2] > 0]
    return {"aggregate_tps": tokens / (t1 - t0) if t1 > t0 else 0.0,
            "ms_per_token": statistics.median(per) if per else 0.0, "tokens": tokens}


def bench_sessions(addresses: list[str], sessions: Sequence[int], n_decode: int, reps: int,
                   mode: str = "ring", hop_addresses: dict[str, str] | None = None) -> dict[str, Any]:
    """Aggregate decode tok/s for each session count (median over ``reps``, after one warm-up), and
    the ratio of each to one session: ``{"1": {...}, "4": {...}, "ratio_4_over_1": x}``."""
    out: dict[str, Any] = {}
    decode_sessions(addresses, 1, 8, mode, hop_addresses=hop_addresses)  # warm-up
    for n in sessions:
        runs = [decode_sessions(addresses, n, n_decode, mode, hop_addresses=hop_addresses) for _ in range(reps)]
        out[str(n)] = {"aggregate_tps": _stat([r["aggregate_tps"] for r in runs]),
                       "ms_per_token": _stat([r["ms_per_token"] for r in runs])}
    if "1" in out:
        for n in sessions:
            if n != 1:
                out[f"ratio_{n}_over_1"] = out[str(n)]["aggregate_tps"]["median"] / out["1"]["aggregate_tps"]["median"]
    return out


def _behind_links(addresses: list[str], link: Any) -> tuple[list[str], dict[str, str] | None]:
    """The stage addresses a client uses with every stage behind an emulated link (``link``: a
    LinkDelay, or None for direct connections), and the hop addresses the stages use for each
    other: the client shares the first stage's host, so its link to the first stage is direct."""
    if link is None:
        return list(addresses), None
    delayed = {a: link.relay(a) for a in addresses}
    client = [addresses[0]] + [delayed[a] for a in addresses[1:]]
    hop = {addresses[0]: delayed[addresses[0]], **{delayed[a]: delayed[a] for a in addresses[1:]}}
    return client, hop


def bench_links(slices: Sequence[Path], delay_ms: float, n_decode: int, reps: int, sessions: int,
                stage_threads: int, rpc_model: Path | None = None,
                rpc_threads: int = 2) -> dict[str, Any]:
    """Stages on emulated slow links (a :class:`~nakshatra.bench.linkdelay.LinkDelay` relay in front of
    every stage; the client shares the first stage's host, so its link to the first stage is
    direct). Per-token decode latency of the client-relayed path, forwarding and ring, and the
    aggregate decode tok/s of ``sessions`` concurrent ring sessions against one.

    Expected per-token latency with forwarding = hops x delay + compute, with hops = the number
    of stages (first -> ... -> last -> back to the first stage's host); ``compute_ms`` is the
    sum of the stages' compute per token, measured here with one thread per stage. Each
    emulated host gets one thread (``stage_threads`` overrides), as N hosts share these cores.
    """
    from ..server.local import LocalStages
    from .linkdelay import LinkDelay

    n = len(slices)
    # the emulated hosts share this machine's cores: one thread each, no turn-taking (a stage
    # that idles for a link's delay and then wakes a second thread pays that wake-up on a VM)
    with LocalStages(slices, threads=stage_threads or 1, ctx=1024, max_sessions=max(sessions, 1),
                     cpu_lock=False) as ls, \
            LinkDelay(delay_ms) as link:
        # the stages' compute per decoded token, from a ring session on direct connections
        with Chain(ls.addresses, ring=True) as c, \
                c.session(GREEDY, n_predict=n_decode + 1, ignore_eog=True) as sess:
            for _ in sess.ring(_prompt(SESSION_PROMPT, c.stages[0].n_vocab), n_decode + 1):
                pass
            compute_ms = sum(x["decode_us"] / 1e3 / max(1, x["decode_steps"]) for x in _session_stats(c, sess.id))
        client, hop = _behind_links(ls.addresses, link)
        out: dict[str, Any] = {"delay_ms": delay_ms, "stages": n, "compute_ms_per_token": compute_ms,
                               "expected_ms_per_token": n * delay_ms + compute_ms}
        for mode in ("relay", "forwarding", "ring"):
            decode_sessions(client, 1, 4, mode, hop_addresses=hop)  # warm-up (connections, pages)
            runs = [decode_sessions(client, 1, n_decode, mode, hop_addresses=hop) for _ in range(reps)]
            out[f"{mode}_ms_per_token"] = _stat([r["ms_per_token"] for r in runs])
        for mode in ("forwarding", "ring"):
            out[f"{mode}_over_expected"] = out[f"{mode}_ms_per_token"]["median"] / out["expected_ms_per_token"]
        out["relay_over_ring"] = out["relay_ms_per_token"]["median"] / out["ring_ms_per_token"]["median"]
        out["sessions"] = bench_sessions(client, [1, sessions], n_decode, reps, "ring", hop)
    if rpc_model is not None:
        # llama.cpp RPC on the same links: its host shares the first server's machine
        from .linkdelay import LinkDelay
        from .rpc_baseline import run_rpc_baseline

        with LinkDelay(delay_ms) as link:
            rpc = run_rpc_baseline(rpc_model, n_servers=n, threads=rpc_threads, prompt_lens=(16,),
                                   n_decode=min(n_decode, 16), reps=1, progress=False,
                                   address_map=lambda i, a: a if i == 0 else link.relay(a))
        out["rpc_ms_per_token"] = {k: 1e3 / v for k, v in rpc["decode_tps"].items() if k == "median"}
        out["rpc_ms_per_token"].update(spread=0.0, n=rpc["decode_tps"]["n"])
        out["ring_over_rpc_speed"] = out["rpc_ms_per_token"]["median"] / out["ring_ms_per_token"]["median"]
    return out


def _decode_wire(data: bytes, dtype: int, n_embd: int) -> Any:
    """Wire bytes (cpp/protocol/wire.h) -> ``[n_rows, n_embd] float32`` numpy array."""
    import numpy as np

    if dtype == 1:
        return np.frombuffer(data, dtype="<f4").reshape(-1, n_embd)
    if dtype == 2:
        u = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return u.view(np.float32).reshape(-1, n_embd)
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, 4 + n_embd)
    scale = rows[:, :4].copy().view("<f4")
    return rows[:, 4:].view(np.int8).astype(np.float32) * scale


WIRE_PROMPTS = ["The history of the Roman Empire", "def quicksort(arr):", "Photosynthesis is the process",
                "My favourite recipe for pancakes", "The stock market today", "Once upon a time, in a village"]


def bench_wire(slices: Sequence[Path], formats: Sequence[str], n_predict: int, stage_threads: int) -> dict[str, Any]:
    """Each wire format against f32 on a fixed prompt set (greedy, client-relayed so the client sees
    every hidden state): bytes of one token's hidden state as sent (framing aside), greedy agreement (generated tokens equal to the
    f32 run's at the same position, over all prompts; and prompts whose whole output is equal), and
    the largest absolute difference of the hidden states at each stage boundary (prefill rows),
    also relative to the largest |value| there."""
    import numpy as np

    from ..server.local import LocalStages

    runs: dict[str, Any] = {}
    for fmt in ["f32", *[f for f in formats if f != "f32"]]:
        with LocalStages(slices, threads=stage_threads, ctx=512, max_sessions=1, extra_args=["--wire", fmt]) as ls, \
                Chain(ls.addresses) as c:
            n_embd = c.stages[0].n_embd
            toks, states, wire = [], [], []
            for p in WIRE_PROMPTS:
                with c.session(GREEDY, capture=True) as sess:
                    r = sess.feed(c.tokenize(p))
                    seq = [r["token"]]
                    for _ in range(n_predict - 1):
                        r = sess.feed([r["token"]])
                        seq.append(r["token"])
                    wire.append(len(sess.hidden[0][-1]))  # one decode step's hidden state, as sent
                    toks.append(seq)
                    states.append([_decode_wire(h[0], {"f32": 1, "bf16": 2, "q8r": 3}[fmt], n_embd)
                                   for h in sess.hidden[:-1]])
            runs[fmt] = {"tokens": toks, "states": states, "wire": statistics.median(wire)}
    base = runs["f32"]
    out: dict[str, Any] = {}
    for fmt, r in runs.items():
        same = sum(a == b for ta, tb in zip(r["tokens"], base["tokens"]) for a, b in zip(ta, tb))
        total = sum(len(t) for t in base["tokens"])
        diffs, rels = [], []
        for b in range(len(slices) - 1):
            d = max(float(np.max(np.abs(s[b] - s0[b]))) for s, s0 in zip(r["states"], base["states"]))
            m = max(float(np.max(np.abs(s0[b]))) for s0 in base["states"])
            diffs.append(d)
            rels.append(d / m if m else 0.0)
        out[fmt] = {"state_bytes_per_token": r["wire"],
                    "greedy_agreement": same / total,
                    "prompts_identical": sum(ta == tb for ta, tb in zip(r["tokens"], base["tokens"])),
                    "prompts": len(WIRE_PROMPTS),
                    "max_abs_diff": diffs, "max_rel_diff": rels}
    return out


# ---- speculative decoding on the two fixed workloads -----------------------------------------

SPEC_DRAFT_MAX = 8  # what `nak bench --speculate` asks for (a stage grants at most 8)


def _spec_run(addresses: list[str], hop: dict[str, str] | None, prompt: str, n_predict: int,
              draft_max: int) -> dict[str, Any]:
    """One greedy ring generation of the chat turn ``prompt``: the tokens, decode tok/s (first
    token to last), ring trips (replies: one per trip, a window's tokens arrive together) and the
    session's draft counts."""
    with Chain(addresses, ring=True, hop_addresses=hop, draft_max=draft_max, timeout_s=300) as c:
        toks = c.tokenize(c.apply_chat_template([("user", prompt)]), parse_special=True)
        with c.session(GREEDY, n_predict=n_predict) as sess:
            out: list[int] = []
            trips, last_step, t_first, t_last = 0, -1, 0.0, 0.0
            for r in sess.ring(toks, n_predict):
                t_last = time.perf_counter()
                if not out:
                    t_first = t_last
                if r["step"] != last_step:
                    trips, last_step = trips + 1, r["step"]
                if r["is_eog"]:
                    break
                out.append(r["token"])
            n = len(out)
            return {"tokens": out, "tps": (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else 0.0,
                    "trips": max(trips, 1), "windows": sess.spec_windows, "drafted": sess.spec_drafted,
                    "accepted": sess.spec_accepted, "prompt_tokens": len(toks)}


def bench_speculation(slices: Sequence[Path], delay_ms: float, n_predict: int, reps: int,
                      stage_threads: int) -> dict[str, Any]:
    """Speculative decoding against the same ring without it, on the workloads of
    :mod:`nakshatra.bench.workloads`, over emulated links of ``delay_ms`` one way (0: direct), the two
    configurations interleaved (plain, speculative, plain, ...). Per workload: decode tok/s of
    each (median of ``reps``), their ratio, the acceptance rate (accepted / drafted tokens),
    tokens per ring trip, and the agreement of the greedy outputs (tokens equal up to the first
    difference, over the plain run's length; ``first_divergence`` -1 when they agree
    throughout)."""
    from contextlib import nullcontext

    from ..server.local import LocalStages
    from .linkdelay import LinkDelay
    from .workloads import WORKLOADS

    out: dict[str, Any] = {"delay_ms": delay_ms, "draft_max": SPEC_DRAFT_MAX, "n_predict": n_predict, "reps": reps}
    with LocalStages(slices, threads=stage_threads or 1, ctx=2048, max_sessions=1, cpu_lock=False) as ls, \
            (LinkDelay(delay_ms) if delay_ms > 0 else nullcontext()) as link:
        client, hop = _behind_links(ls.addresses, link)
        _spec_run(client, hop, WORKLOADS["free"], 8, 0)  # warm-up (connections, pages)
        for name, prompt in WORKLOADS.items():
            runs: dict[int, list[dict[str, Any]]] = {0: [], SPEC_DRAFT_MAX: []}
            for _ in range(reps):
                for dm in runs:
                    runs[dm].append(_spec_run(client, hop, prompt, n_predict, dm))
            plain, spec = runs[0], runs[SPEC_DRAFT_MAX]
            a, b = plain[0]["tokens"], spec[0]["tokens"]
            diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), -1)
            if diff < 0 and len(a) != len(b):
                diff = min(len(a), len(b))
            drafted = sum(r["drafted"] for r in spec)
            res = {"plain_tps": _stat([r["tps"] for r in plain]), "spec_tps": _stat([r["tps"] for r in spec]),
                   "acceptance": sum(r["accepted"] for r in spec) / drafted if drafted else 0.0,
                   "tokens_per_trip": statistics.median(len(r["tokens"]) / r["trips"] for r in spec),
                   "windows": statistics.median(r["windows"] for r in spec),
                   "tokens": len(a), "spec_tokens": len(b), "prompt_tokens": plain[0]["prompt_tokens"],
                   "first_divergence": diff,
                   "agreement": (diff if diff >= 0 else len(a)) / len(a) if a else 1.0}
            res["speedup"] = res["spec_tps"]["median"] / res["plain_tps"]["median"] if res["plain_tps"]["median"] else 0.0
            out[name] = res
    return out


# ---- pipelined prefill ---------------------------------------------------------------------------

def _ttft_ms(addresses: list[str], hop: dict[str, str] | None, prompt: list[int], prefill_chunk: int,
             ramp: bool = False) -> float:
    """Time to the first token of a ring session given ``prompt``, ms."""
    with Chain(addresses, ring=True, hop_addresses=hop, prefill_chunk=prefill_chunk, prefill_ramp=ramp,
               timeout_s=300) as c, \
            c.session(GREEDY, n_predict=1) as sess:
        t0 = time.perf_counter()
        for _ in sess.ring(prompt, 1):
            break
        return (time.perf_counter() - t0) * 1e3


def bench_prefill_pipeline(model: Path, delay_ms: float, prompt_len: int, reps: int) -> dict[str, Any]:
    """Time to first token of a ``prompt_len``-token prompt through 2 stages, each pinned to its
    own core (one thread), over emulated links of ``delay_ms`` one way (0: direct), fed as one
    n_batch chunk after another (``prefill_chunk`` 0), pipelined in micro-batches of 512 (the
    default: the same output) and in micro-batches of 256 with short ends (``prefill_ramp``),
    interleaved; the median of ``reps`` each and the ratios to the first."""
    import os
    from contextlib import nullcontext

    from ..client.chain import DEFAULT_PREFILL_CHUNK
    from ..server.local import LocalStages, cached_parts
    from .linkdelay import LinkDelay

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        raise StageError("pipelined prefill is measured with 2 stages on 2 cores of their own (sched_setaffinity)")
    cores = sorted(os.sched_getaffinity(0))[:2]
    slices = cached_parts(model, 2, progress=False)
    pin = [lambda c=c: os.sched_setaffinity(0, {c}) for c in cores]
    with LocalStages(slices, threads=1, ctx=prompt_len + 256, max_sessions=1, cpu_lock=False, preexec=pin) as ls, \
            (LinkDelay(delay_ms) if delay_ms > 0 else nullcontext()) as link:
        client, hop = _behind_links(ls.addresses, link)
        with Chain(client, hop_addresses=hop) as c:
            prompt = _prompt(prompt_len, c.stages[0].n_vocab)
        _ttft_ms(client, hop, prompt[:64], DEFAULT_PREFILL_CHUNK)  # warm-up
        configs = {"sequential": (0, False), "pipelined": (DEFAULT_PREFILL_CHUNK, False), "pipelined_ramp": (256, True)}
        runs: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(reps):
            for name, (chunk, ramp) in configs.items():
                runs[name].append(_ttft_ms(client, hop, prompt, chunk, ramp))
    out: dict[str, Any] = {"prompt_len": prompt_len, "delay_ms": delay_ms, "stages": 2,
                           "micro_batch": DEFAULT_PREFILL_CHUNK}
    for name in configs:
        out[f"{name}_ttft_ms"] = _stat(runs[name])
    for name in ("pipelined", "pipelined_ramp"):
        out[f"{name}_over_sequential"] = out[f"{name}_ttft_ms"]["median"] / out["sequential_ttft_ms"]["median"]
    return out
