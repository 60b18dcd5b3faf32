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
  stage -> client, for each stage); with forwarding N + 1 (client -> first -> ... -> last -> client);
  a ring N (first -> ... -> last -> first; the copy of each token sent to the client is off the path).
* per-hop overhead (us) = (chain ms per decoded token - sum of stage compute ms per token) / hops.
* wire bytes per token per hop = bytes sent and received for the decode steps / steps / hops.
* time split (:func:`time_split`) = where a chain's decode token goes, ms per token summed over the
  stages: inside llama_decode, waiting for the CPU lock, in the stages outside llama_decode, and on
  the links; beside the unsplit model with llama.cpp's default polling and with ``poll=0`` (the
  stages' thread pool), all from the interleaved runs of :func:`paired_decode`.
* paired decode ratio = the median over ``pairs`` of chain decode tok/s / single decode tok/s,
  each pair measured back to back (single, chain; the next pair chain, single), so a drift of the
  machine's speed (other work on shared cores, thermal state) lands on both sides of a pair
  instead of on one configuration (:func:`paired_decode`). Its spread (max - min of the pair
  ratios) says how far one pair can be off; the separate single and chain medians above are
  measured one configuration after the other and drift with the machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import procfs
from ..client.chain import Chain, SamplerParams

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
    mode: str = "ring"
    slices: list[Path] = field(default_factory=list)
    sessions: int = 4          # concurrent sessions for the aggregate decode figure (0: skip)
    wire: Sequence[str] = ()   # wire formats to compare with f32 (bf16, q8r)
    link_delay_ms: float = 0.0  # > 0: also measure over emulated links of this one-way delay
    rpc_baseline: bool = False
    key: bool = False           # also a chain with a cluster key (authenticated, every frame MACed)
    no_repack: bool = False     # also a chain whose stages keep no repacked weight copy (--no-repack)
    pairs: int = 21             # interleaved single / chain decode pairs (paired_decode; 0: skip)
    speculate: int = 0          # > 0: speculative decoding on the fixed workloads, this many tokens each


def _stat(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "spread": max(values) - min(values), "n": len(values)}


def _prompt(n: int, n_vocab: int) -> list[int]:
    """A deterministic prompt of ``n`` ordinary token ids (same for every configuration)."""
    return [1 + (i * 7919) % (min(n_vocab, 32000) - 1) for i in range(n)]


def proc_status_bytes(pid: int, field: str) -> int:
    """A kB field of /proc/PID/status (``VmHWM``, ``VmRSS``, ...) in bytes; 0 if unknown (the
    process is gone, or there is no /proc: macOS)."""
    try:
        for line in (procfs.PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a process (its peak resident set), bytes; 0 if unknown (no /proc, as on macOS:
    ``nak bench`` then shows "n/a" with :func:`nakshatra.procfs.needs_proc`'s message)."""
    return proc_status_bytes(pid, "VmHWM")


def bench_single(cfg: BenchConfig, n_vocab: int) -> dict[str, Any]:
    """The unsplit model in this process (nakshatra._nakshatra.Reference, stock llama.cpp path)."""
    from .. import _nakshatra

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


def bench_chain(cfg: BenchConfig, addresses: list[str], pids: list[int], key: bytes | None = None) -> dict[str, Any]:
    """A chain of local stage processes through the client (nakshatra.client.chain.Chain), in
    ``cfg.mode``: relay, forwarding or ring. Decode ignores end-of-generation tokens (as
    llama-bench does); stage compute and bytes per decode step come from each stage's STATS.
    ``key``: the stages' cluster key (then every connection authenticates and MACs its frames)."""
    mode = cfg.mode
    out: dict[str, Any] = {"prefill_tps": {}, "ttft_ms": {}, "mode": mode}
    decode, hop_us, wire = [], [], []
    compute_ms: list[list[float]] = []
    with Chain(addresses, forwarding=mode != "relay", ring=mode == "ring", key=key) as chain:
        n_st = len(chain.stages)
        hops = {"relay": 2 * n_st, "forwarding": n_st + 1, "ring": n_st}[mode]
        n_vocab = chain.stages[0].n_vocab
        for n in cfg.prompt_lens:
            prompt = _prompt(n, n_vocab)
            first = n == cfg.prompt_lens[0]
            n_predict = cfg.n_decode + 1 if first else 1
            pre, ttft = [], []
            for rep in range(cfg.reps + 1):  # rep 0 is the warm-up
                with chain.session(GREEDY, n_predict=n_predict, ignore_eog=True) as sess:
                    replies = sess.ring(prompt, n_predict) if mode == "ring" else sess.relay(prompt, n_predict)
                    t0 = time.perf_counter()
                    times = []
                    client_in = 0
                    for _ in replies:
                        times.append(time.perf_counter())
                        if len(times) == 1:
                            client_in = sum(sess.wire_bytes)
                    client_in = sum(sess.wire_bytes) - client_in
                    if rep == 0:
                        continue
                    pre.append(n / (times[0] - t0))
                    ttft.append((times[0] - t0) * 1e3)
                    if not first:
                        continue
                    steps = len(times) - 1
                    dt = times[-1] - times[0]
                    decode.append(steps / dt)
                    st = _session_stats(chain, sess.id)
                    stage_ms = [s["decode_us"] / 1e3 / max(1, s["decode_steps"]) for s in st]
                    compute_ms.append(stage_ms)
                    hop_us.append((dt * 1e3 / steps - sum(stage_ms)) * 1e3 / hops)
                    if mode == "relay":  # the client saw every leg
                        wire.append(client_in / steps / hops)
                    else:  # every leg into a stage, plus (forwarding) the replies to this client
                        into = sum(s["decode_bytes_in"] for s in st)
                        wire.append((into + (client_in if mode == "forwarding" else 0)) / steps / hops)
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


def _session_stats(chain: Chain, session_id: int) -> list[dict[str, int]]:
    """Each stage's STATS entry for one session (decode_us, decode_steps, decode_bytes_in, ...)."""
    import json

    return [json.loads(c.stats())["sessions"][str(session_id)] for c in chain.clients]


def ratios(res: dict[str, Any]) -> dict[str, float]:
    """The headline ratios of one run (medians): chain / single and chain / rpc for decode and each
    prefill length, concurrent sessions / one, and over emulated links latency / expected."""
    single, chain = res["single"], res["chain"]
    r = {"decode_chain_over_single": chain["decode_tps"]["median"] / single["decode_tps"]["median"]}
    if "paired" in chain:
        r["decode_chain_over_single_paired"] = chain["paired"]["ratio"]["median"]
        r["decode_chain_over_single_paired_spread"] = chain["paired"]["ratio"]["spread"]
        if "poll0_ratio" in chain["paired"]:
            r["decode_single_poll0_over_single_paired"] = chain["paired"]["poll0_ratio"]["median"]
    for n, s in single["prefill_tps"].items():
        r[f"prefill{n}_chain_over_single"] = chain["prefill_tps"][n]["median"] / s["median"]
    first = next(iter(single["prefill_tps"]))
    r["prefill_chain_over_single"] = r[f"prefill{first}_chain_over_single"]
    if "rpc" in res:
        rpc = res["rpc"]
        r["decode_chain_over_rpc"] = chain["decode_tps"]["median"] / rpc["decode_tps"]["median"]
        for n in single["prefill_tps"]:
            if n in rpc["prefill_tps"]:
                r[f"prefill{n}_chain_over_rpc"] = chain["prefill_tps"][n]["median"] / rpc["prefill_tps"][n]["median"]
        if f"prefill{first}_chain_over_rpc" in r:
            r["prefill_chain_over_rpc"] = r[f"prefill{first}_chain_over_rpc"]
    for k, v in chain.get("sessions", {}).items():
        if k.startswith("ratio_"):
            r[f"sessions_{k[6:]}"] = v
    if "chain_key" in res:
        k = res["chain_key"]
        r["decode_key_over_plain"] = k["decode_tps"]["median"] / chain["decode_tps"]["median"]
        r["per_hop_us_key_minus_plain"] = k["per_hop_overhead_us"]["median"] - chain["per_hop_overhead_us"]["median"]
    if "chain_norepack" in res:
        nr = res["chain_norepack"]
        r["decode_norepack_over_repack"] = nr["decode_tps"]["median"] / chain["decode_tps"]["median"]
        own = sum(st.get("rss_anon_bytes", 0) for st in chain["stages"])
        if own:
            r["own_memory_norepack_over_repack"] = sum(st.get("rss_anon_bytes", 0) for st in nr["stages"]) / own
    links = res.get("links")
    if links:
        r["links_forwarding_over_expected"] = links["forwarding_over_expected"]
        r["links_ring_over_expected"] = links["ring_over_expected"]
        r["links_relay_over_ring"] = links["relay_over_ring"]
        if "ring_over_rpc_speed" in links:
            r["links_decode_chain_over_rpc"] = links["ring_over_rpc_speed"]
        for k, v in links["sessions"].items():
            if k.startswith("ratio_"):
                r[f"links_sessions_{k[6:]}"] = v
    return r


def _memory_split(chain: dict[str, Any], addresses: list[str]) -> None:
    """Add each stage's memory as the host pays it to ``chain["stages"]``: ``rss_anon_bytes`` (its
    own pages: weight copies, KV, buffers) and ``rss_file_bytes`` (file-backed: the mmap'd
    slice, reclaimable), bytes, from the stages' health (cpp/platform/platform.h, nak_rss_split)."""
    with Chain(addresses) as c:
        health = {st.address: c.clients[i].hello()["health"] for i, st in enumerate(c.stages)}
    for st in chain["stages"]:
        h = health.get(st["address"], {})
        st["rss_anon_bytes"] = int(h.get("rss_anon_bytes", 0))
        st["rss_file_bytes"] = int(h.get("rss_file_bytes", 0))


# where a chain's decode token goes (ms per token, summed over the stages; see time_split)
SPLIT_PARTS = ("llama_decode", "cpu_lock", "in_stages", "links")


def time_split(stats: Sequence[dict[str, int]], ms_per_token: float) -> dict[str, float]:
    """Where one session's decode time went, in ms per token, from each stage's STATS counters
    for it (``stats``: one dict per stage, as :func:`_session_stats` returns) and the client's
    ``ms_per_token``: ``llama_decode`` (inside llama_decode, summed over the stages),
    ``cpu_lock`` (waiting for the CPU lock, ``--cpu-lock``), ``in_stages`` (the rest of the time
    from a step's frame arriving at a stage's event loop to its frames ready to send: queueing,
    the hand-off to the compute thread and back, wire decoding, sampling, framing) and ``links``
    (everything else: the send calls, the kernel moving the frames, waking the next stage's
    event loop, and in forwarding mode the client's round trip)."""
    def per(field: str, count: str) -> float:
        return sum(s.get(field, 0) / max(1, s.get(count, 0)) for s in stats) / 1e3

    llama, lock, turn = per("decode_llama_us", "decode_steps"), per("decode_lock_us", "decode_steps"), \
        per("decode_turn_us", "decode_turns")
    return {"llama_decode": llama, "cpu_lock": lock, "in_stages": turn - llama - lock, "links": ms_per_token - turn}


def _ring_decode(chain: Chain, mode: str, prompt: list[int], n_decode: int) -> tuple[float, dict[str, float]]:
    """Decode tok/s of one greedy session of ``n_decode`` steps after ``prompt`` (end of
    generation ignored), timed from the first sampled token to the last, and where its time went
    (:func:`time_split`, ms per token)."""
    with chain.session(GREEDY, n_predict=n_decode + 1, ignore_eog=True) as sess:
        replies = sess.ring(prompt, n_decode + 1) if mode == "ring" else sess.relay(prompt, n_decode + 1)
        times = [time.perf_counter() for _ in replies]
        tps = (len(times) - 1) / (times[-1] - times[0])
        split = time_split(_session_stats(chain, sess.id), 1e3 / tps) if mode != "relay" else {}
    return tps, split


def paired_decode(cfg: BenchConfig, addresses: list[str], n_vocab: int) -> dict[str, Any]:
    """Decode tok/s of the unsplit model (this process) and of the chain at ``addresses``,
    measured interleaved: ``cfg.pairs`` rounds, each a single run, a run of the unsplit model
    whose thread-pool workers sleep between graphs (``poll=0``, as the stages run) and a chain run
    back to back (in alternating order, after one warm-up of each), ``cfg.n_decode`` steps after
    the first prompt length. Returns ``{"ratio": stat of chain/single per pair, "ratios": [...],
    "single_tps", "chain_tps", "single_poll0_tps": stats, "poll0_ratio": stat of poll-0/single,
    "split": {part: stat of ms per token} (:func:`time_split`; empty in relay mode),
    "single_ms": stat of the single run's ms per token}`` (stat: median, spread = max - min, n)."""
    from .. import _nakshatra

    prompt = _prompt(cfg.prompt_lens[0], n_vocab)
    n_ctx = len(prompt) + cfg.n_decode + 16
    ref = _nakshatra.Reference(str(cfg.model), n_ctx=n_ctx, n_threads=cfg.threads)
    ref0 = _nakshatra.Reference(str(cfg.model), n_ctx=n_ctx, n_threads=cfg.threads, poll=0)
    mode = cfg.mode

    def single(r: Any) -> float:
        return cfg.n_decode / (r.time_run(prompt, cfg.n_decode)[1] / 1e6)

    with Chain(addresses, forwarding=mode != "relay", ring=mode == "ring") as chain:
        runs = {"single": lambda: single(ref), "poll0": lambda: single(ref0),
                "chain": lambda: _ring_decode(chain, mode, prompt, cfg.n_decode)}
        for run in runs.values():
            run()  # warm-up
        got: dict[str, list[Any]] = {k: [] for k in runs}
        for i in range(cfg.pairs):
            for k in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                got[k].append(runs[k]())
    s_tps, s0_tps = got["single"], got["poll0"]
    c_tps = [tps for tps, _ in got["chain"]]
    pair = [c / s for s, c in zip(s_tps, c_tps)]
    splits = [sp for _, sp in got["chain"] if sp]
    return {"ratio": _stat(pair), "ratios": pair, "single_tps": _stat(s_tps), "chain_tps": _stat(c_tps),
            "single_poll0_tps": _stat(s0_tps), "poll0_ratio": _stat([b / a for a, b in zip(s_tps, s0_tps)]),
            "single_ms": _stat([1e3 / s for s in s_tps]),
            "split": {k: _stat([sp[k] for sp in splits]) for k in SPLIT_PARTS} if splits else {}}


def run_bench(cfg: BenchConfig, status: Any = None) -> dict[str, Any]:
    """Measure single and chain (and, as configured, concurrent sessions, wire formats, emulated
    links and llama.cpp RPC) in one run; returns ``{"config", "single", "chain", ["rpc"], ["wire"],
    ["links"], "ratios"}``. ``status(text)`` is called before each part."""
    from ..server.local import LocalStages, cached_parts
    from ..server.serve import kv_bytes_estimate

    say = status or (lambda text: None)
    slices = cfg.slices or cached_parts(cfg.model, cfg.stages, progress=False)
    from .links import SESSION_PROMPT, bench_links, bench_sessions, bench_speculation, bench_wire

    n_ctx = max(*cfg.prompt_lens, SESSION_PROMPT) + cfg.n_decode + 16
    max_sessions = max(1, cfg.sessions)
    with LocalStages(slices, threads=cfg.stage_threads, ctx=n_ctx, max_sessions=max_sessions) as ls:
        say(f"chain of {len(slices)} stages ({cfg.mode})")
        chain = bench_chain(cfg, ls.addresses, ls.pids)
        if cfg.sessions > 1:
            say(f"{cfg.sessions} concurrent sessions")
            chain["sessions"] = bench_sessions(ls.addresses, [1, cfg.sessions], cfg.n_decode, cfg.reps, "ring")
        for st, path in zip(chain["stages"], slices):
            st["slice_bytes"] = Path(path).stat().st_size
            st["kv_bytes"] = kv_bytes_estimate(Path(path), n_ctx, max_sessions) or 0
        with Chain(ls.addresses) as c:
            n_vocab = c.stages[0].n_vocab
        if cfg.pairs > 0:
            say(f"single and chain decode, interleaved ({cfg.pairs} pairs)")
            chain["paired"] = paired_decode(cfg, ls.addresses, n_vocab)
        # peak RSS is read once every measurement on these stages is done
        for st, pid in zip(chain["stages"], ls.pids):
            st["peak_rss_bytes"] = peak_rss_bytes(pid)
        _memory_split(chain, ls.addresses)
    chain_norepack = None
    if cfg.no_repack:
        with LocalStages(slices, threads=cfg.stage_threads, ctx=n_ctx, max_sessions=max_sessions,
                         extra_args=["--no-repack"]) as ls_nr:
            say(f"chain of {len(slices)} stages ({cfg.mode}) with --no-repack")
            chain_norepack = bench_chain(cfg, ls_nr.addresses, ls_nr.pids)
            _memory_split(chain_norepack, ls_nr.addresses)
    chain_key = None
    if cfg.key:
        import tempfile

        from ..auth import generate_key_file

        with tempfile.TemporaryDirectory(prefix="nak-bench-key-") as d:
            key = generate_key_file(Path(d) / "cluster.key")
            with LocalStages(slices, threads=cfg.stage_threads, ctx=n_ctx, max_sessions=max_sessions,
                             key_file=Path(d) / "cluster.key") as ls_key:
                say(f"chain of {len(slices)} stages ({cfg.mode}) with a cluster key")
                chain_key = bench_chain(cfg, ls_key.addresses, ls_key.pids, key=key)
    say("single process")
    single = bench_single(cfg, n_vocab)
    res: dict[str, Any] = {
        "config": {"model": str(cfg.model), "stages": len(slices), "prompt_lens": list(cfg.prompt_lens),
                   "n_decode": cfg.n_decode, "reps": cfg.reps, "threads": cfg.threads,
                   "stage_threads": ls.threads, "mode": cfg.mode, "sessions": cfg.sessions,
                   "link_delay_ms": cfg.link_delay_ms, "wire": list(cfg.wire), "pairs": cfg.pairs},
        "single": single, "chain": chain}
    if chain_key is not None:
        res["chain_key"] = chain_key
    if chain_norepack is not None:
        res["chain_norepack"] = chain_norepack
    if cfg.rpc_baseline:
        from .rpc_baseline import run_rpc_baseline

        say(f"llama.cpp RPC with {len(slices)} servers")
        res["rpc"] = run_rpc_baseline(cfg.model, n_servers=len(slices), threads=cfg.threads,
                                      prompt_lens=tuple(cfg.prompt_lens), n_decode=cfg.n_decode, reps=cfg.reps)
    if cfg.wire:
        say("wire formats")
        res["wire"] = bench_wire(slices, cfg.wire, 16, cfg.stage_threads)
    if cfg.link_delay_ms > 0:
        say(f"emulated {cfg.link_delay_ms:g} ms links")
        res["links"] = bench_links(slices, cfg.link_delay_ms, min(cfg.n_decode, 64), cfg.reps,
                                   max(cfg.sessions, 4), cfg.stage_threads,
                                   rpc_model=cfg.model if cfg.rpc_baseline else None, rpc_threads=cfg.threads)
    if cfg.speculate > 0:
        say(f"speculative decoding ({cfg.link_delay_ms:g} ms links)")
        res["speculation"] = bench_speculation(slices, cfg.link_delay_ms, cfg.speculate, cfg.reps, cfg.stage_threads)
    res["ratios"] = ratios(res)
    return res
