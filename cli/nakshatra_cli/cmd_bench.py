"""``nak bench``: the unsplit model against a chain of local stages, and as asked llama.cpp RPC,
concurrent sessions, wire formats, emulated links, sliding-window KV (--swa), speculative
decoding (--speculate), pipelined prefill (--pipeline-prompt) and mismatched hosts (--hosts);
with the Rich tables of each."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from nakshatra.errors import NakError

from .app import app, err_console


def _side_by_side(title: str, cols: tuple[str, ...]) -> Table:
    """A table comparing one chain in two configurations: a metric column, then right-aligned ones."""
    t = Table(title=title, title_justify="left")
    for col in cols:
        t.add_column(col, justify="right" if col != cols[0] else "left")
    return t


def _bench_swa(model_path: Path, *, stages: int, stage_threads: int, n_decode: int, reps: int, prompt_len: int,
               json_out: Optional[Path]) -> None:
    """nak bench --swa: window KV against --swa-full, side by side (nakshatra.bench.swa)."""
    from nakshatra.bench.swa import run_swa_bench
    from nakshatra.server.local import cached_parts

    ctx, max_sessions = 4096, 8  # nak serve's defaults: the memory a user gets without options
    slices = cached_parts(model_path, stages, progress=False)
    with err_console.status("measuring ...") as st:
        res = run_swa_bench(slices, ctx=ctx, max_sessions=max_sessions, prompt_len=prompt_len, n_decode=n_decode,
                            reps=reps, stage_threads=stage_threads, status=lambda text: st.update(f"measuring: {text} ..."))
    if json_out:
        json_out.write_text(json.dumps(res, indent=1) + "\n")
    w, f, r = res["window"], res["full"], res["ratios"]

    def fmt(x: dict) -> str:
        return f"{x['median']:.1f} ± {x['spread'] / 2:.1f}"

    t = _side_by_side(f"sliding-window KV: {model_path.name} in {stages} stages, --ctx {ctx} --max-sessions {max_sessions}, "
                      f"window {res['config']['n_swa']}, prompt {prompt_len} tokens, median of {reps}",
                      ("metric", "window + ubatch (default)", "--swa-full", "default / full"))
    t.add_row("own memory, all stages, MiB", f"{w['own_bytes'] / 2**20:.0f}", f"{f['own_bytes'] / 2**20:.0f}",
              f"{r['own_memory_window_over_full']:.2f}x")
    t.add_row(f"prefill {prompt_len} tokens, ms", fmt(w["prefill_ms"]), fmt(f["prefill_ms"]),
              f"{r['prefill_ms_window_over_full']:.2f}x")
    t.add_row(f"decode tok/s ({n_decode} steps)", fmt(w["decode_tps"]), fmt(f["decode_tps"]),
              f"{r['decode_tps_window_over_full']:.2f}x")
    t.add_row(f"roll back {4} positions and feed them again, ms", fmt(w["short_rollback_ms"]),
              fmt(f["short_rollback_ms"]), f"{r['short_rollback_ms_window_over_full']:.2f}x")
    t.add_row(f"roll back to position {prompt_len // 2} and feed 1 token, ms", fmt(w["long_rollback_ms"]),
              fmt(f["long_rollback_ms"]), f"{r['long_rollback_ms_window_over_full']:.2f}x")
    t.add_row("sessions fed again (short / long rollback)",
              f"{w['short_rollback_refeeds']['median']:.0f} / {w['long_rollback_refeeds']['median']:.0f}",
              f"{f['short_rollback_refeeds']['median']:.0f} / {f['long_rollback_refeeds']['median']:.0f}", "")
    Console().print(t)


def _bench_speculate(model_path: Path, *, stages: int, stage_threads: int, n_predict: int, reps: int,
                     delay_ms: float, pipeline_prompt: int, json_out: Optional[Path]) -> None:
    from nakshatra.bench.links import bench_prefill_pipeline, bench_speculation
    from nakshatra.server.local import cached_parts

    links = f"{delay_ms:g} ms links" if delay_ms > 0 else "direct links"
    out: dict = {}
    if n_predict:
        slices = cached_parts(model_path, stages, progress=sys.stderr.isatty())
        with err_console.status("measuring speculative decoding ..."):
            out["speculation"] = bench_speculation(slices, delay_ms, n_predict, reps, stage_threads)
        _print_speculation(out["speculation"], stages, links, reps)
    if pipeline_prompt:
        with err_console.status("measuring pipelined prefill ..."):
            p = out["prefill_pipeline"] = bench_prefill_pipeline(model_path, delay_ms, pipeline_prompt, reps)
        t = _side_by_side(f"time to first token, {pipeline_prompt}-token prompt, 2 stages on a core each, {links}, "
                          f"median of {reps}", ("", "ms", "/ sequential"))
        t.add_row("one n_batch chunk, stage after stage", f"{p['sequential_ttft_ms']['median']:.0f}", "1.00x")
        t.add_row(f"pipelined, micro-batches of {p['micro_batch']} (default: the same output)",
                  f"{p['pipelined_ttft_ms']['median']:.0f}", f"{p['pipelined_over_sequential']:.2f}x")
        t.add_row("pipelined, micro-batches of 256, 64 first and last",
                  f"{p['pipelined_ramp_ttft_ms']['median']:.0f}", f"{p['pipelined_ramp_over_sequential']:.2f}x")
        Console().print(t)
    if json_out:
        json_out.write_text(json.dumps(out, indent=1) + "\n")
        err_console.print(f"wrote {json_out}", markup=False)


def _print_speculation(res: dict, stages: int, links: str, reps: int) -> None:
    t = _side_by_side(f"ring, {stages} stages, {links}, greedy, draft-max {res['draft_max']}, median of {reps}",
                      ("", "rewrite", "free"))
    w = [res["rewrite"], res["free"]]
    t.add_row("prompt tokens", *(str(x["prompt_tokens"]) for x in w))
    t.add_row("tokens generated (plain / speculative)", *(f"{x['tokens']} / {x['spec_tokens']}" for x in w))
    t.add_row("decode tok/s, plain ring", *(f"{x['plain_tps']['median']:.1f}" for x in w))
    t.add_row("decode tok/s, speculative", *(f"{x['spec_tps']['median']:.1f}" for x in w))
    t.add_row("speculative / plain", *(f"{x['speedup']:.2f}x" for x in w))
    t.add_row("acceptance (accepted / drafted)", *(f"{x['acceptance']:.0%}" for x in w))
    t.add_row("tokens per ring trip", *(f"{x['tokens_per_trip']:.2f}" for x in w))
    t.add_row("windows verified", *(f"{x['windows']:.0f}" for x in w))
    t.add_row("greedy agreement with plain", *(f"{x['agreement']:.0%}" + (f" (first difference at token {x['first_divergence']})" if x["first_divergence"] >= 0 else "") for x in w))
    Console().print(t)


def _bench_hosts(model_path: Path, hosts: str, *, n_decode: int, reps: int, json_out: Optional[Path]) -> None:
    """nak bench --hosts: probe, plan and measure on emulated hosts (nakshatra.bench.hosts)."""
    from nakshatra.bench.hosts import parse_hosts, run_hosts_bench

    shares = parse_hosts(hosts)
    with err_console.status("measuring ...") as st:
        res = run_hosts_bench(model_path, shares, n_decode=n_decode, reps=reps,
                              status=lambda text: st.update(f"measuring: {text} ..."))
    if json_out:
        json_out.write_text(json.dumps(res, indent=1))
    t = Table(title=f"emulated hosts (cgroup CPU quotas; each may hold {res['config']['mem_fraction']:.0%} of the "
                    "model's weights and KV): probed, planned, and an even split", title_justify="left")
    for col in ("host", "CPU share", "probed layers/s", "planned layers", "even split"):
        t.add_column(col, justify="left" if col == "host" else "right")
    for h in res["hosts"]:
        t.add_row(h["name"], f"{h['share']:g}", f"{h['layers_per_s']:.0f}", h["planned"] or "none", h["even"])
    Console().print(t)
    d = Table(title=f"ring decode, one session, {res['config']['n_decode']} tokens, median of {res['config']['reps']}",
              title_justify="left")
    for col in ("chain", "layers", "decode tok/s", "ratio"):
        d.add_column(col, justify="left" if col in ("chain", "layers") else "right")
    d.add_row("even split", ", ".join(res["even"]["ranges"]), f"{res['even']['decode_tps']['median']:.1f}", "1.00x")
    d.add_row("planned", ", ".join(res["planned"]["ranges"]), f"{res['planned']['decode_tps']['median']:.1f}",
              f"{res['ratio_planned_over_even']:.2f}x")
    Console().print(d)


@app.command()
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="A GGUF file or a built-in name.")] = "smollm2",
    stages: Annotated[int, typer.Option("--stages", help="Local stages in the chain.")] = 3,
    threads: Annotated[int, typer.Option("--threads", "-t", help="llama.cpp threads of the single process.")] = 2,
    stage_threads: Annotated[int, typer.Option("--stage-threads", help="Threads per stage (0: cores shared between stages).")] = 0,
    reps: Annotated[int, typer.Option("--reps", help="Repetitions after one warm-up (median and spread).")] = 3,
    pairs: Annotated[int, typer.Option("--pairs", help="Single and chain decode measured interleaved, this many pairs (median of the pair ratios; 0: skip).")] = 21,
    n_decode: Annotated[int, typer.Option("--n-decode", help="Decode steps measured.")] = 128,
    prompt_lens: Annotated[str, typer.Option("--prompt-lens", help="Prefill lengths, comma separated.")] = "128,512",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON to this file.")] = None,
    mode: Annotated[str, typer.Option("--mode", help="Chain path: ring (default), forwarding or relay.")] = "ring",
    synthetic: Annotated[Optional[str], typer.Option("--synthetic", help="Bench a random-weight llama-shaped Q4_0 model of this size instead, e.g. 1.5B (written once into the cache).")] = None,
    sessions: Annotated[int, typer.Option("--sessions", help="Also measure this many concurrent sessions' aggregate decode (0: skip).")] = 4,
    wire: Annotated[str, typer.Option("--wire", help="Wire formats to compare with f32, e.g. bf16,q8r ('' to skip).")] = "bf16,q8r",
    link_delay_ms: Annotated[float, typer.Option("--link-delay-ms", help="Also measure over emulated links of this one-way delay, ms (0: skip).")] = 0.0,
    rpc_baseline: Annotated[bool, typer.Option("--rpc-baseline", help="Also run llama.cpp's RPC (rpc-server + llama-bench, built once from the same source).")] = False,
    key: Annotated[bool, typer.Option("--key", help="Also measure the chain with a fresh cluster key (authenticated handshake, a MAC on every frame), side by side with the chain without one.")] = False,
    no_repack: Annotated[bool, typer.Option("--no-repack", help="Also measure the chain with stages started --no-repack (no repacked weight copy), side by side: decode speed and each stage's own memory.")] = False,
    swa: Annotated[bool, typer.Option("--swa", help="Instead: sliding-window KV as the stages keep it (the window plus one ubatch) against --swa-full (the whole context), side by side: own memory, prefill, decode and rollback times (a model with sliding-window layers: --model gemma3-270m).")] = False,
    speculate: Annotated[int, typer.Option("--speculate", help="Instead: speculative decoding against the same ring without it, side by side (interleaved), on the two fixed workloads (rewrite, free: nakshatra.bench.workloads), generating up to this many tokens each; with --link-delay-ms over emulated links.")] = 0,
    pipeline_prompt: Annotated[int, typer.Option("--pipeline-prompt", help="Instead (with --speculate, in the same run): time to first token of a prompt of this many tokens through 2 stages, each pinned to its own core, fed in one n_batch chunk and pipelined in micro-batches of 512, side by side (interleaved); with --link-delay-ms over emulated links.")] = 0,
    hosts: Annotated[Optional[str], typer.Option("--hosts", help="Instead: emulate mismatched hosts with cgroup CPU quotas (root), e.g. fast=1.0,slow=0.25 (shares of one CPU); probe each, plan, and measure the planned chain against an even split side by side.")] = None,
) -> None:
    """Measure the unsplit model (one process) and a chain of local stages side by side, and as
    asked llama.cpp RPC, concurrent sessions, wire formats and emulated slow links.

    Example: [b]nak bench --rpc-baseline --link-delay-ms 10 --json bench.json[/b]
    """
    from nakshatra.bench.side_by_side import BenchConfig, run_bench
    from nakshatra.gguf.models import resolve_model
    from nakshatra.server.serve import WIRE_FORMATS

    try:
        lens = [int(x) for x in prompt_lens.split(",") if x.strip()]
    except ValueError:
        raise NakError(f"--prompt-lens {prompt_lens!r}: give token counts like 128,512") from None
    if not lens or min(lens) < 1 or n_decode < 1 or reps < 1 or stages < 1:
        raise NakError("--prompt-lens, --n-decode, --reps and --stages must be positive")
    if pairs < 0:
        raise NakError(f"--pairs {pairs} must be >= 0 (0: no interleaved decode pairs)")
    if mode not in ("ring", "forwarding", "relay"):
        raise NakError(f"--mode {mode!r}: use ring, forwarding or relay")
    wires = [w.strip() for w in wire.split(",") if w.strip()]
    for w in wires:
        if w not in WIRE_FORMATS:
            raise NakError(f"--wire {w!r}: use formats of {', '.join(WIRE_FORMATS)}")
    if sessions < 0 or link_delay_ms < 0:
        raise NakError("--sessions and --link-delay-ms must be >= 0")
    if synthetic:
        from nakshatra.gguf.synthetic import cached_synthetic_llama

        try:
            with err_console.status(f"writing a {synthetic} random-weight model (once) ..."):
                model_path = cached_synthetic_llama(synthetic)
        except ValueError as e:
            raise NakError(f"--synthetic: {e}") from None
    else:
        model_path = resolve_model(model)
    if swa:
        _bench_swa(model_path, stages=stages, stage_threads=stage_threads, n_decode=min(n_decode, 32), reps=reps,
                   prompt_len=max(lens), json_out=json_out)
        return
    if hosts is not None:
        _bench_hosts(model_path, hosts, n_decode=min(n_decode, 64), reps=reps, json_out=json_out)
        return
    if speculate < 0 or pipeline_prompt < 0:
        raise NakError("--speculate (tokens per workload) and --pipeline-prompt (prompt tokens) must be >= 0 (0: skip)")
    if speculate or pipeline_prompt:
        _bench_speculate(model_path, stages=stages, stage_threads=stage_threads, n_predict=speculate, reps=reps,
                         delay_ms=link_delay_ms, pipeline_prompt=pipeline_prompt, json_out=json_out)
        return
    cfg = BenchConfig(model=model_path, stages=stages, prompt_lens=lens, n_decode=n_decode,
                      reps=reps, threads=threads, stage_threads=stage_threads, mode=mode,
                      sessions=sessions, wire=wires, link_delay_ms=link_delay_ms, rpc_baseline=rpc_baseline,
                      key=key, no_repack=no_repack, pairs=pairs)
    with err_console.status("measuring ...") as st:
        res = run_bench(cfg, status=lambda text: st.update(f"measuring: {text} ..."))
    print_bench(res, cfg)
    if json_out:
        json_out.write_text(json.dumps(res, indent=1) + "\n")
        err_console.print(f"wrote {json_out}", markup=False)


def _peak_rss_cell(n_bytes: int) -> str:
    """A stage's peak RSS for the bench table, MiB; "n/a" with the reason when unknown (0: no
    /proc/PID/status to read it from, as on macOS)."""
    if n_bytes > 0:
        return f"{n_bytes / 2**20:.0f}"
    from nakshatra import procfs

    return "n/a: needs Linux /proc" if not procfs.available() else "n/a"


def _print_time_split(paired: dict, n_stages: int) -> None:
    """Where one decode token's time goes, chain against one process (medians over the pairs)."""
    sp, one = paired["split"], paired["single_ms"]["median"]
    t = _side_by_side(f"where a decode token goes (ms, medians of {paired['ratio']['n']} interleaved runs)",
                      ("part", "ms / token", "share of one process"))
    t.add_row("one process (llama.cpp's default polling)", f"{one:.2f}", "1.00")
    poll0 = paired["poll0_ratio"]["median"]
    t.add_row("one process, workers sleeping between graphs (poll 0, as stages run)",
              f"{one / poll0:.2f}", f"{1 / poll0:.2f}")
    names = {"llama_decode": f"chain: llama_decode, {n_stages} stages", "cpu_lock": "chain: waiting for the CPU lock",
             "in_stages": "chain: in the stages outside llama_decode (hand-offs, sampling, framing)",
             "links": "chain: links (kernel, waking the next stage)"}
    total = 0.0
    for part, name in names.items():
        ms = sp[part]["median"]
        total += ms
        t.add_row(name, f"{ms:.2f}", f"{ms / one:.2f}")
    t.add_row("chain: sum", f"{total:.2f}", f"{total / one:.2f}")
    Console().print(t)


def print_bench(res: dict, cfg) -> None:
    """The Rich tables of one `nak bench` run."""
    single, chain, r = res["single"], res["chain"], res["ratios"]
    rpc = res.get("rpc")

    def fmt(st: dict | None) -> str:
        return f"{st['median']:.1f} ± {st['spread'] / 2:.1f}" if st else ""

    t = Table(title=f"nak bench: {cfg.model.name}; single: {cfg.threads} threads; chain: {res['config']['stages']} "
                    f"stages x {res['config']['stage_threads']} threads, {cfg.mode}"
                    + (f"; rpc: {rpc['servers']} servers" if rpc else ""),
              title_justify="left")
    t.add_column("metric")
    t.add_column("single", justify="right")
    t.add_column("chain", justify="right")
    t.add_column("chain / single", justify="right")
    if rpc:
        t.add_column("llama.cpp rpc", justify="right")
        t.add_column("chain / rpc", justify="right")

    def row(name: str, a: dict, b: dict, ratio: str, c: dict | None = None, rr: str = "") -> None:
        t.add_row(name, fmt(a), fmt(b), ratio, *((fmt(c), rr) if rpc else ()))

    for n in map(str, cfg.prompt_lens):
        row(f"prefill {n} tok/s", single["prefill_tps"][n], chain["prefill_tps"][n],
            f"{r[f'prefill{n}_chain_over_single']:.2f}x", rpc["prefill_tps"].get(n) if rpc else None,
            f"{r[f'prefill{n}_chain_over_rpc']:.2f}x" if f"prefill{n}_chain_over_rpc" in r else "")
        row(f"TTFT {n} ms", single["ttft_ms"][n], chain["ttft_ms"][n], "", rpc["ttft_ms"].get(n) if rpc else None)
    row(f"decode tok/s ({cfg.n_decode} steps)", single["decode_tps"], chain["decode_tps"],
        f"{r['decode_chain_over_single']:.2f}x", rpc["decode_tps"] if rpc else None,
        f"{r['decode_chain_over_rpc']:.2f}x" if "decode_chain_over_rpc" in r else "")
    paired = chain.get("paired")
    if paired:
        row(f"decode tok/s, interleaved ({paired['ratio']['n']} pairs)", paired["single_tps"], paired["chain_tps"],
            f"{paired['ratio']['median']:.2f}x ± {paired['ratio']['spread'] / 2:.2f}")
    t.add_row("per-hop overhead us", "", fmt(chain["per_hop_overhead_us"]), "")
    t.add_row("wire bytes / token / hop", "", f"{chain['wire_bytes_per_token_per_hop']['median']:.0f}", "")
    ses = chain.get("sessions")
    if ses:
        n = str(cfg.sessions)
        t.add_row(f"aggregate decode tok/s, {n} sessions", "", fmt(ses[n]["aggregate_tps"]),
                  f"{ses[f'ratio_{n}_over_1']:.2f}x one session")
    Console().print(t)
    if paired and paired.get("split"):
        _print_time_split(paired, res["config"]["stages"])
    ck = res.get("chain_key")
    if ck:
        k = _side_by_side("cluster key: the same chain with an authenticated handshake and a MAC on every frame",
                          ("metric", "without key", "with key", "difference"))
        k.add_row("decode tok/s", fmt(chain["decode_tps"]), fmt(ck["decode_tps"]), f"{r['decode_key_over_plain']:.2f}x")
        k.add_row("per-hop overhead us", fmt(chain["per_hop_overhead_us"]), fmt(ck["per_hop_overhead_us"]),
                  f"{r['per_hop_us_key_minus_plain']:+.1f} us")
        first = str(cfg.prompt_lens[0])
        k.add_row(f"prefill {first} tok/s", fmt(chain["prefill_tps"][first]), fmt(ck["prefill_tps"][first]), "")
        Console().print(k)
    nr = res.get("chain_norepack")
    if nr:
        k = _side_by_side("--no-repack: the same chain without llama.cpp's repacked weight copies",
                          ("metric", "repacked (default)", "--no-repack", "ratio"))
        k.add_row("decode tok/s", fmt(chain["decode_tps"]), fmt(nr["decode_tps"]), f"{r['decode_norepack_over_repack']:.2f}x")
        own = sum(st["rss_anon_bytes"] for st in chain["stages"]) / 2**20
        own_nr = sum(st["rss_anon_bytes"] for st in nr["stages"]) / 2**20
        k.add_row("own memory, all stages, MiB", f"{own:.0f}", f"{own_nr:.0f}",
                  f"{r['own_memory_norepack_over_repack']:.2f}x" if "own_memory_norepack_over_repack" in r else "")
        Console().print(k)
    s = Table(title="stages", title_justify="left")
    for col in ("stage", "layers", "compute ms/token", "peak RSS MiB", "own MiB", "file MiB", "slice + KV MiB"):
        s.add_column(col, justify="right" if col != "stage" else "left")
    for st in chain["stages"]:
        s.add_row(st["address"], st["layers"], f"{st['compute_ms_per_token']:.2f}", _peak_rss_cell(st["peak_rss_bytes"]),
                  f"{st.get('rss_anon_bytes', 0) / 2**20:.0f}", f"{st.get('rss_file_bytes', 0) / 2**20:.0f}",
                  f"{(st['slice_bytes'] + st['kv_bytes']) / 2**20:.0f}")
    Console().print(s)
    if "wire" in res:
        w = Table(title="wire formats (against f32, greedy, fixed prompts)", title_justify="left")
        for col in ("format", "bytes / token", "greedy agreement", "identical outputs", "max |diff| per boundary",
                    "relative"):
            w.add_column(col, justify="right" if col != "format" else "left")
        for f, v in res["wire"].items():
            w.add_row(f, f"{v['state_bytes_per_token']:.0f}", f"{v['greedy_agreement']:.0%}",
                      f"{v['prompts_identical']}/{v['prompts']}", ", ".join(f"{d:.3g}" for d in v["max_abs_diff"]),
                      ", ".join(f"{d:.2%}" for d in v["max_rel_diff"]))
        Console().print(w)
    links = res.get("links")
    if links:
        k = Table(title=f"emulated links: {links['delay_ms']:g} ms one way, {links['stages']} stages; expected "
                        f"{links['expected_ms_per_token']:.1f} ms/token = {links['stages']} x delay + compute",
                  title_justify="left")
        k.add_column("path")
        k.add_column("ms / token", justify="right")
        k.add_column("/ expected", justify="right")
        for m in ("relay", "forwarding", "ring"):
            k.add_row(m, fmt(links[f"{m}_ms_per_token"]),
                      f"{links[f'{m}_ms_per_token']['median'] / links['expected_ms_per_token']:.2f}x")
        if "rpc_ms_per_token" in links:
            k.add_row("llama.cpp rpc", f"{links['rpc_ms_per_token']['median']:.1f}",
                      f"{links['rpc_ms_per_token']['median'] / links['expected_ms_per_token']:.2f}x "
                      f"(ring {links['ring_over_rpc_speed']:.1f}x faster)")
        ls = links["sessions"]
        n = [x for x in ls if x.isdigit() and x != "1"][0]
        k.add_row(f"ring, {n} sessions: aggregate tok/s", fmt(ls[n]["aggregate_tps"]),
                  f"{ls[f'ratio_{n}_over_1']:.2f}x one session ({ls['1']['aggregate_tps']['median']:.1f})")
        Console().print(k)
