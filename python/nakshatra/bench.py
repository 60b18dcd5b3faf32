"""``nak bench``: the unsplit model in one process against a chain of local stages, side by side
in one run, on the same machine, model, prompts and thread count.

For each configuration: prefill tokens/s for each prompt length, decode tokens/s (one token per
step, greedy), time to first token; for the chain also per-stage compute time, the per-hop
overhead, bytes on the wire per token per hop and each stage's peak RSS. Each figure is the
median over ``reps`` repetitions after one warm-up, with the spread (max - min) beside it.
Results are ratios measured in this run, never thresholds.

Definitions:

* prefill tok/s = prompt tokens / (time from sending the prompt to holding the first sampled token);
  that time is also the time to first token (TTFT).
* decode tok/s = decode steps / their wall time.
* hops = one-way network legs per token: a client-relayed chain of N stages makes 2N (client ->
  stage -> client, for each stage); with forwarding N + 1 (client -> first -> ... -> last -> client).
* per-hop overhead (us) = (chain ms per decoded token - sum of stage compute ms per token) / hops.
* wire bytes per token per hop = bytes sent and received for the decode steps / steps / hops.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chain import Chain, SamplerParams

GREEDY = SamplerParams(temp=0.0)


@dataclass
class BenchConfig:
    """What to measure. ``prompt_lens`` and ``n_decode`` are tokens; ``threads`` is llama.cpp
    threads of the single process; ``stage_threads`` per chain stage (0: the machine's cores
    shared between the stages, as ``nak run`` does)."""

    model: Path
    stages: int = 3
    prompt_lens: Sequence[int] = (128, 512)
    n_decode: int = 128
    reps: int = 3
    threads: int = 2
    stage_threads: int = 0
    forwarding: bool = False
    slices: list[Path] = field(default_factory=list)


def _stat(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "spread": max(values) - min(values), "n": len(values)}


def _prompt(n: int, n_vocab: int) -> list[int]:
    """A deterministic prompt of ``n`` ordinary token ids (same for every configuration)."""
    return [1 + (i * 7919) % (min(n_vocab, 32000) - 1) for i in range(n)]


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a process (its peak resident set), bytes; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def bench_single(cfg: BenchConfig, n_vocab: int) -> dict[str, Any]:
    """The unsplit model in this process (nakshatra._nakshatra.Reference, stock llama.cpp path)."""
    from . import _nakshatra

    n_ctx = max(cfg.prompt_lens) + cfg.n_decode + 16
    ref = _nakshatra.Reference(str(cfg.model), n_ctx=n_ctx, n_threads=cfg.threads)
    out: dict[str, Any] = {"prefill_tps": {}, "ttft_ms": {}}
    decode = []
    for n in cfg.prompt_lens:
        prompt = _prompt(n, n_vocab)
        ref.time_run(prompt, 4)  # warm-up
        pre, ttft = [], []
        for _ in range(cfg.reps):
            p_us, d_us = ref.time_run(prompt, cfg.n_decode if n == cfg.prompt_lens[0] else 0)
            pre.append(n / (p_us / 1e6))
            ttft.append(p_us / 1e3)
            if n == cfg.prompt_lens[0]:
                decode.append(cfg.n_decode / (d_us / 1e6))
        out["prefill_tps"][str(n)] = _stat(pre)
        out["ttft_ms"][str(n)] = _stat(ttft)
    out["decode_tps"] = _stat(decode)
    return out


def bench_chain(cfg: BenchConfig, addresses: list[str], pids: list[int]) -> dict[str, Any]:
    """A chain of local stage processes through the client (nakshatra.chain.Chain)."""
    out: dict[str, Any] = {"prefill_tps": {}, "ttft_ms": {}}
    decode, hop_us, wire = [], [], []
    compute_ms: list[list[float]] = []
    with Chain(addresses, forwarding=cfg.forwarding) as chain:
        hops = len(chain.stages) + 1 if cfg.forwarding else 2 * len(chain.stages)
        n_vocab = chain.stages[0].n_vocab
        for n in cfg.prompt_lens:
            prompt = _prompt(n, n_vocab)
            first = n == cfg.prompt_lens[0]
            pre, ttft = [], []
            for rep in range(cfg.reps + 1):  # rep 0 is the warm-up
                with chain.session(GREEDY) as sess:
                    t0 = time.perf_counter()
                    r = sess.feed(prompt)
                    t1 = time.perf_counter()
                    if rep == 0:
                        continue
                    pre.append(n / (t1 - t0))
                    ttft.append((t1 - t0) * 1e3)
                    if not first:
                        continue
                    c0, w0 = list(sess.compute_us), list(sess.wire_bytes)
                    before = _stage_counters(chain, sess.id) if cfg.forwarding else None
                    t2 = time.perf_counter()
                    for _ in range(cfg.n_decode):
                        r = sess.feed([r["token"]])
                    dt = time.perf_counter() - t2
                    steps = cfg.n_decode
                    decode.append(steps / dt)
                    stage_ms = [(c - c_0) / 1e3 / steps for c, c_0 in zip(sess.compute_us, c0)]
                    wire_total = sum(w - w_0 for w, w_0 in zip(sess.wire_bytes, w0))
                    if cfg.forwarding:  # the client sees the first and last legs only: ask the stages
                        after = _stage_counters(chain, sess.id)
                        stage_ms = [(a[0] - b[0]) / 1e3 / steps for a, b in zip(after, before)]
                        # every leg into a stage, plus the last stage's replies to this client
                        wire_total = sum(a[1] - b[1] for a, b in zip(after, before)) + sess.wire_bytes[-1] - w0[-1]
                    compute_ms.append(stage_ms)
                    hop_us.append((dt * 1e3 / steps - sum(stage_ms)) * 1e3 / hops)
                    wire.append(wire_total / steps / hops)
            out["prefill_tps"][str(n)] = _stat(pre)
            out["ttft_ms"][str(n)] = _stat(ttft)
        out["stages"] = [{"address": s.address, "layers": str(s.layers), "peak_rss_bytes": peak_rss_bytes(pid),
                          "compute_ms_per_token": statistics.median(ms[i] for ms in compute_ms)}
                         for i, (s, pid) in enumerate(zip(chain.stages, pids))]
    out["decode_tps"] = _stat(decode)
    out["hops"] = hops
    out["per_hop_overhead_us"] = _stat(hop_us)
    out["wire_bytes_per_token_per_hop"] = _stat(wire)
    return out


def _stage_counters(chain: Chain, session_id: int) -> list[tuple[int, int]]:
    """Each stage's (compute us for the session, bytes received) so far, from its STATS."""
    import json

    out = []
    for c in chain.clients:
        st = json.loads(c.stats())
        out.append((st["sessions"][str(session_id)]["compute_us"], st["bytes_in"]))
    return out


def ratios(single: dict[str, Any], chain: dict[str, Any]) -> dict[str, float]:
    """chain / single for decode and each prefill length (medians)."""
    r = {"decode_chain_over_single": chain["decode_tps"]["median"] / single["decode_tps"]["median"]}
    for n, s in single["prefill_tps"].items():
        r[f"prefill{n}_chain_over_single"] = chain["prefill_tps"][n]["median"] / s["median"]
    first = next(iter(single["prefill_tps"]))
    r["prefill_chain_over_single"] = r[f"prefill{first}_chain_over_single"]
    return r


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure single and chain in one run; returns ``{"single", "chain", "ratios", "config"}``."""
    from .local import LocalStages, cached_parts

    slices = cfg.slices or cached_parts(cfg.model, cfg.stages, progress=False)
    n_ctx = max(cfg.prompt_lens) + cfg.n_decode + 16
    with LocalStages(slices, threads=cfg.stage_threads, ctx=n_ctx, max_sessions=1) as ls:
        chain = bench_chain(cfg, ls.addresses, ls.pids)
        with Chain(ls.addresses) as c:
            n_vocab = c.stages[0].n_vocab
    single = bench_single(cfg, n_vocab)
    return {"config": {"model": str(cfg.model), "stages": len(slices), "prompt_lens": list(cfg.prompt_lens),
                       "n_decode": cfg.n_decode, "reps": cfg.reps, "threads": cfg.threads,
                       "stage_threads": ls.threads, "forwarding": cfg.forwarding},
            "single": single, "chain": chain, "ratios": ratios(single, chain)}
