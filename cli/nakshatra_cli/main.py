"""``nak``: the Nakshatra command line (Typer + Rich).

Errors are one red line on stderr naming the fix, exit code 1; ``--debug`` shows the traceback.
``nak run`` writes only the generated text to stdout; everything else goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from nakshatra.errors import NakError, StageError

err_console = Console(stderr=True)
app = typer.Typer(
    name="nak",
    help="Run one GGUF model split by layer ranges across several machines (llama.cpp stages).",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
)

_state = {"debug": False}

# ---- shared option aliases ----------------------------------------------------------------

Threads = Annotated[int, typer.Option("--threads", "-t", help="llama.cpp threads per stage (0: all cores for nak serve; cores shared between local stages for nak run).",
                                      envvar="NAK_THREADS")]
Ctx = Annotated[int, typer.Option("--ctx", "-c", help="KV positions per session (the stage's n_ctx is ctx x max-sessions).")]
KeyFile = Annotated[str, typer.Option("--key-file", help="Cluster key from `nak keygen` (default: $NAK_KEY, hex, if set): both ends authenticate, every frame is MACed.")]


def cluster_key(key_file: str, cluster=None) -> bytes | None:
    """The cluster key a command talks to stages with: ``--key-file`` (``key_file``), else the
    ``key_file`` of the cluster file ``cluster`` (a :class:`nakshatra.cluster.ClusterFile`; the
    path is relative to that file), else ``$NAK_KEY``; None when none is set. Raises NakError for
    a missing, unreadable or malformed key file."""
    from nakshatra.auth import load_key

    if not key_file and cluster is not None and cluster.key_file:
        key_file = str(cluster.resolve(cluster.key_file))
    return load_key(key_file)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show llama.cpp's log (info level).")] = False,
) -> None:
    _state["debug"] = debug
    if verbose:
        os.environ["NAK_LOG_LEVEL"] = "2"
        try:
            from nakshatra import _nakshatra

            _nakshatra.set_log_level(2)
        except ImportError:
            pass


# ---- run ------------------------------------------------------------------------------------

@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    model: Annotated[str, typer.Option("--model", "-m", help="A GGUF file or a built-in name (smollm2, gemma3-270m).")] = "smollm2",
    parts: Annotated[int, typer.Option("--parts", "-p", help="Local stages to cut the model into (without --chain).")] = 3,
    chain: Annotated[Optional[str], typer.Option("--chain", help="Running stages, host:port,host:port,... in any order.")] = None,
    n_predict: Annotated[int, typer.Option("--n-predict", "-n", help="Tokens to generate (-1: until end of generation).")] = 128,
    temp: Annotated[float, typer.Option("--temp", help="Temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k")] = 40,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.95,
    min_p: Annotated[float, typer.Option("--min-p")] = 0.05,
    repeat_penalty: Annotated[float, typer.Option("--repeat-penalty", help="1 disables it.")] = 1.0,
    repeat_last_n: Annotated[int, typer.Option("--repeat-last-n")] = 64,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Sampling seed (default: random).")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--raw", help="--chat (the default when the model has a chat template): the prompt is one user turn in the model's chat template, as ollama run and llama-cli do. --raw: continue the prompt as plain text (llama-completion -no-cnv).", show_default=False)] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print timings per stage to stderr.")] = False,
    forwarding: Annotated[bool, typer.Option("--forwarding/--relay", help="Stages pass hidden states to each other (forwarding) or through the client (relay).")] = False,
    ring: Annotated[bool, typer.Option("--ring", help="Forwarding, and the last stage hands each token straight back to the first.")] = False,
    draft_max: Annotated[int, typer.Option("--draft-max", help="Speculative decoding: the last stage drafts up to this many tokens per window with llama.cpp's n-gram drafter (prompt lookup) and the chain verifies them in one trip; 0 turns it off. A stage grants at most 8.")] = 0,
    threads: Threads = 0,
    ctx: Ctx = 4096,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds a stage may go without answering or making progress before its range fails over to a replica (a slow stage that computes is waited for).")] = 60.0,
    key_file: KeyFile = "",
    discover: Annotated[bool, typer.Option("--discover", help="Build the chain from the stages announcing on the LAN (mDNS, _nakshatra._tcp); refuses an incomplete one.")] = False,
    discover_timeout: Annotated[float, typer.Option("--discover-timeout", help="Seconds to listen for stages with --discover.")] = 2.0,
    model_sha: Annotated[Optional[str], typer.Option("--model-sha", help="With --discover: the model's sha256 (a prefix will do) when stages of several models answer.")] = None,
) -> None:
    """Answer a prompt through a chain of stages; only the answer goes to stdout.

    The prompt is a user turn in the model's chat template when it has one (--raw: plain text
    continuation). Examples: [b]nak run "Tell me about the stars"[/b] (SmolLM2 cut in 3, 3 local
    stages); [b]nak run --raw "Once upon a time"[/b];
    [b]nak run --chain hostA:7071,hostB:7072 -n 128 --temp 0.7 --seed 1 "prompt"[/b];
    [b]nak run --discover "prompt"[/b] (the stages that answer on the LAN)
    """
    from nakshatra.auth import load_key
    from nakshatra.chain import Chain, GenerationStats, SamplerParams

    key = load_key(key_file)
    if n_predict == 0 or n_predict < -1:
        raise NakError(f"-n {n_predict}: give the number of tokens to generate (1 or more), or -1 for "
                       "until end of generation")
    sampler = SamplerParams(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
    sampler.check()
    st = GenerationStats()

    def generate(addresses: list[str]) -> None:
        if timeout <= 0:
            raise NakError(f"--timeout {timeout} must be > 0 seconds")
        with Chain(addresses, forwarding=forwarding, ring=ring, timeout_s=timeout, key=key, draft_max=draft_max) as c:
            if stats:
                err_console.print(" → ".join(f"{s.address} ({s.layers})" for s in c.stages), markup=False)
            use_chat = _use_chat_template(c, prompt, chat)
            bar = _PrefillBar() if sys.stderr.isatty() else None
            wrote = False
            for text in c.generate(prompt, n_predict, sampler, chat=use_chat, stats=st, on_prefill=bar):
                if bar is not None:
                    bar.close()
                sys.stdout.write(text)
                sys.stdout.flush()
                wrote = wrote or bool(text)
            if wrote:
                sys.stdout.write("\n")
                sys.stdout.flush()
            else:
                err_console.print(_why_nothing(st, use_chat, sampler), markup=False)
            if stats:
                _print_stats(st, c.stages)

    if discover:
        from nakshatra.discovery import discover_chain

        if chain:
            raise NakError("give --chain or --discover, not both")
        found = discover_chain(discover_timeout, model_sha)
        err_console.print(f"discovered {len(found)} stages: {','.join(found)}", markup=False)
        chain = ",".join(found)
    elif model_sha:
        raise NakError("--model-sha picks the model of discovered stages: add --discover")
    if chain:
        generate([a for a in chain.split(",") if a.strip()])
        return
    from nakshatra.local import LocalStages, cached_parts
    from nakshatra.models import resolve_model

    path = resolve_model(model)
    slices = cached_parts(path, parts, progress=sys.stderr.isatty())
    with LocalStages(slices, threads=threads, ctx=ctx, max_sessions=1, key_file=key_file or None) as ls:
        generate(ls.addresses)


def _use_chat_template(c, prompt: str, chat: bool | None) -> bool:
    """Whether ``nak run`` wraps the prompt in the model's chat template: as asked (--chat,
    --raw), else when the model has a template llama.cpp knows (a note on stderr when not)."""
    if chat is not None:
        return chat
    from nakshatra.errors import StageError

    try:
        c.apply_chat_template([("user", prompt)])
        return True
    except StageError as e:
        if e.code != "bad_request":
            raise
        err_console.print(f"nak run: {str(e).split(';')[0]}: continuing the prompt as plain text (as --raw)",
                          markup=False)
        return False


def _why_nothing(st, chat: bool, sampler) -> str:
    """The stderr line for a generation that produced no text, saying why."""
    if st.n_generated > 0:
        return f"nak run: the {st.n_generated} generated tokens decode to no text"
    if st.stop_reason == "eog":
        why = "the first token sampled was end-of-generation"
        if chat:
            hint = "rephrase the prompt"
        else:
            hint = "a raw prompt that reads as finished often ends at once: drop --raw to ask it as a chat turn"
        if sampler.temp > 0:
            hint += ", or try another --seed or a lower --temp"
        return f"nak run: nothing generated: {why}; {hint}"
    if st.stop_reason == "context":
        return "nak run: nothing generated: the prompt fills the context; start the stages with a larger --ctx"
    return "nak run: nothing generated"


class _PrefillBar:
    """A Rich progress bar on stderr for a prompt prefilled in several n_batch chunks; gone once
    the first token arrives."""

    def __init__(self) -> None:
        self.progress = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("prefill"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                                     TimeElapsedColumn(), console=err_console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("prefill", total=total)
        self.progress.update(self.task, completed=done)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _print_stats(st, stages) -> None:
    t = Table(title="generation", title_justify="left")
    t.add_column("stage")
    t.add_column("layers")
    t.add_column("compute ms", justify="right")
    t.add_column("network ms", justify="right")
    t.add_column("wire KiB", justify="right")
    for s, c, n, b in zip(stages, st.stage_compute_ms, st.stage_network_ms, st.wire_bytes):
        t.add_row(s.address, str(s.layers), f"{c:.1f}", f"{n:.1f}", f"{b / 1024:.1f}")
    err_console.print(t)
    err_console.print(f"prompt {st.n_prompt} tokens, time to first token {st.ttft_ms:.1f} ms, "
                      f"prefill {st.prefill_tps:.1f} tok/s; generated {st.n_generated} tokens, "
                      f"decode {st.decode_tps:.1f} tok/s")


# ---- slice / inspect / pull -----------------------------------------------------------------

@app.command("slice")
def slice_cmd(
    model: Annotated[str, typer.Argument(help="The GGUF model to cut: a file, any shard of a split model (NAME-00001-of-00003.gguf; all its shards are read), a built-in name, hf:ORG/REPO\\[:QUANT] or ollama:NAME\\[:TAG].")],
    parts: Annotated[Optional[int], typer.Option("--parts", "-p", help="Number of slices, balanced by bytes.")] = None,
    ranges: Annotated[Optional[str], typer.Option("--ranges", "-r", help="Inclusive ranges, e.g. 0-6,7-16,17-25,26-29.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("slices"),
) -> None:
    """Cut a model into layer-range slices plus a manifest.

    Example: [b]nak slice model.gguf --parts 5 -o slices/[/b]
    """
    from nakshatra.models import resolve_model
    from nakshatra.ranges import parse_ranges
    from nakshatra.slicer import model_layout, slice_model

    if (parts is None) == (ranges is None):
        raise NakError("give exactly one of --parts N or --ranges A-B,C-D,...")
    model_path = resolve_model(model)
    rl = None
    if ranges is not None:
        rl = parse_ranges(ranges, model_layout(model_path, sha256="-").n_layer)
    m = slice_model(model_path, ranges=rl, n_parts=parts, out_dir=out, progress=True)
    t = Table(title=f"{m.model['name']}: {m.model['arch']}, {m.model['n_layer']} layers", title_justify="left")
    t.add_column("slice")
    t.add_column("layers")
    t.add_column("MiB", justify="right")
    for s in m.slices:
        t.add_row(str(out / s.file), str(s.range), f"{s.bytes / 2**20:.1f}")
    err_console.print(t)


@app.command()
def inspect(
    file: Annotated[str, typer.Argument(help="A model (a file, any shard of a split model, a built-in name, hf:ORG/REPO\\[:QUANT] or ollama:NAME\\[:TAG]) or slice.")],
    ctx: Annotated[int, typer.Option("--ctx", "-c", help="Context tokens per session for the KV estimate.")] = 4096,
    max_sessions: Annotated[int, typer.Option("--max-sessions", help="Sessions, each with its own KV (as nak serve --max-sessions).")] = 1,
    swa_full: Annotated[bool, typer.Option("--swa-full", help="Count sliding-window layers with the whole context, as nak serve --swa-full.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")] = False,
) -> None:
    """Show what a model or slice holds and the memory a stage needs for it: the footprint
    predicted from llama.cpp's own allocations for exactly that stage, plus the process.

    Example: [b]nak inspect slices/smollm2.0-9.gguf --ctx 8192[/b]
    """
    from nakshatra.inspection import inspect_gguf, render_inspection
    from nakshatra.models import resolve_model

    if ctx < 1 or max_sessions < 1:
        raise NakError(f"--ctx {ctx} and --max-sessions {max_sessions} must both be >= 1")
    info = inspect_gguf(resolve_model(file), n_ctx=ctx, max_sessions=max_sessions, swa_full=swa_full, predict=True)
    if as_json:
        print(json.dumps(info, indent=1, default=str))
    else:
        Console().print(render_inspection(info))


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="A built-in model (smollm2, gemma3-270m), hf:ORG/REPO\\[@REVISION]\\[:QUANT|:FILE.gguf] or ollama:NAME\\[:TAG].")],
    verify: Annotated[bool, typer.Option("--verify", help="Also check the sha256 of an hf: or ollama: model on disk (reads all of it).")] = False,
) -> None:
    """Fetch a model and print its local path: a built-in one into Nakshatra's cache, a Hugging
    Face one into huggingface_hub's cache (all shards of a split model; the first one's path is
    printed), an Ollama one found in Ollama's store (its blob, used in place).

    Examples: [b]nak pull gemma3-270m[/b], [b]nak pull hf:ORG/REPO:Q4_K_M[/b], [b]nak pull ollama:llama3.2:1b[/b]
    """
    from nakshatra import hub
    from nakshatra.models import pull as do_pull

    if hub.is_ref(name):
        print(hub.resolve(name, progress=True, verify=verify))
    else:
        print(do_pull(name, progress=True))


# ---- keygen ---------------------------------------------------------------------------------

@app.command()
def keygen(
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write (mode 0600).")] = Path("nakshatra.key"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a fresh random cluster key (32 bytes, hex) to a file only you can read.

    Give the same file to every stage and client: [b]nak serve ... --key-file nakshatra.key[/b],
    [b]nak run --chain ... --key-file nakshatra.key[/b] (or export NAK_KEY=$(cat nakshatra.key)).

    Example: [b]nak keygen -o cluster.key[/b]
    """
    from nakshatra.auth import generate_key_file

    generate_key_file(output, overwrite=force)
    err_console.print(f"wrote a cluster key to {output} (mode 0600); copy it to every host over a secure channel",
                      markup=False)


# ---- serve ----------------------------------------------------------------------------------

@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="A slice from nak slice, a whole GGUF (with --layers to cut it), or the http(s) URL of a whole GGUF (with --layers: fetches only those layers' bytes).")],
    layers: Annotated[Optional[str], typer.Option("--layers", "-l", help="Inclusive layer range, e.g. 0-15.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port).")] = 7071,
    insecure: Annotated[bool, typer.Option("--insecure", help="Without a cluster key: allow listening on a non-loopback address (warns) and forwarding to non-loopback next stages (refused otherwise).")] = False,
    key_file: KeyFile = "",
    threads: Threads = 0,
    ctx: Ctx = 4096,
    threads_batch: Annotated[int, typer.Option("--threads-batch", "-tb", help="Threads for prefill (0: as --threads).")] = 0,
    max_sessions: Annotated[int, typer.Option("--max-sessions", help="Concurrent sessions, each with its own KV.")] = 8,
    n_gpu_layers: Annotated[int, typer.Option("--n-gpu-layers", "-ngl", help="Layers to offload (GPU backends; -1 all).")] = -1,
    flash_attn: Annotated[str, typer.Option("--flash-attn", "-fa", help="auto, on or off.")] = "auto",
    cache_type_k: Annotated[str, typer.Option("--cache-type-k", "-ctk")] = "f16",
    cache_type_v: Annotated[str, typer.Option("--cache-type-v", "-ctv")] = "f16",
    ready_json: Annotated[bool, typer.Option("--ready-json", help="Also print the ready line as JSON on stdout.")] = False,
    max_batch: Annotated[int, typer.Option("--max-batch", help="First stage: session steps decoded together (1: no batching).")] = 8,
    wire: Annotated[str, typer.Option("--wire", help="Hidden states sent as f32 (exact), bf16 or q8r (per-row int8).")] = "f32",
    batch_log: Annotated[str, typer.Option("--batch-log", help="Append one JSON line per decoded batch to this file.")] = "",
    no_repack: Annotated[bool, typer.Option("--no-repack", help="Keep the weights in their mmap'd pages only: no repacked copy for faster CPU matmuls (about half the resident memory; decode cost: nak bench --no-repack).")] = False,
    mlock: Annotated[bool, typer.Option("--mlock", help="Lock the weights in RAM (never swapped or compressed), as llama.cpp's --mlock.")] = False,
    swa_full: Annotated[bool, typer.Option("--swa-full", help="Sliding-window layers (Gemma 2/3, ...) keep the whole context's KV, as llama.cpp's --swa-full, instead of the window plus one ubatch: rolling a session back further than that then needs no re-prefill, at far more memory (nak inspect shows both).")] = False,
    batch_hold_ms: Annotated[int, typer.Option("--batch-hold-ms", help="First stage, ring: hold a step up to this long for sessions due back, so they travel as one batch (0: never).")] = 0,
    poll: Annotated[int, typer.Option("--poll", help="Thread-pool polling 0..100 as llama.cpp's --poll (0: idle threads sleep).")] = 0,
    cpu_strict: Annotated[int, typer.Option("--cpu-strict", help="1: pin thread i to CPU i (llama.cpp's --cpu-strict).")] = 0,
    cpu_lock: Annotated[str, typer.Option("--cpu-lock", help="A file that stages sharing this machine lock around each decode (they take turns).")] = "",
    idle_timeout: Annotated[int, typer.Option("--idle-timeout", help="Free a session idle this many seconds.")] = 600,
    max_frame_mb: Annotated[int, typer.Option("--max-frame-mb", help="Largest frame accepted, MiB.")] = 64,
    fetch: Annotated[Optional[list[str]], typer.Option("--fetch", help="If the slice is missing, download it from this URL (nak up prints it; repeat for mirrors) and check it before serving.")] = None,
    sha256: Annotated[str, typer.Option("--sha256", help="The slice file's sha256 (hex): required with --fetch, checked before serving (and, for a remote model, the slice cut from what was fetched).")] = "",
    model_sha256: Annotated[str, typer.Option("--model-sha256", help="A remote model's sha256 (hex), when its server does not send it as the ETag.")] = "",
    announce: Annotated[Optional[bool], typer.Option("--announce/--no-announce", help="Announce this stage on the LAN (mDNS, _nakshatra._tcp) for nak run --discover (default: only when --host is not loopback).")] = None,
) -> None:
    """Serve one slice as a stage (C++ event loop; Ctrl-C stops it).

    Examples: [b]nak serve slices/smollm2.0-9.gguf --port 7071[/b];
    [b]nak serve model.gguf --layers 0-15 --port 7071[/b];
    [b]nak serve http://10.0.0.5:7070/slices/model.gguf --layers 16-31[/b] (fetches only those layers)
    """
    from nakshatra.serve import ServeOptions
    from nakshatra.serve import serve as do_serve

    code = do_serve(ServeOptions(model=model, layers=layers, host=host, port=port, insecure=insecure, key_file=key_file,
                                 threads=threads, threads_batch=threads_batch, ctx=ctx, max_sessions=max_sessions,
                                 n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                                 cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                                 ready_json=ready_json, max_batch=max_batch, wire=wire, batch_log=batch_log,
                                 batch_hold_ms=batch_hold_ms, poll=poll, cpu_strict=bool(cpu_strict),
                                 no_repack=no_repack, mlock=mlock, swa_full=swa_full,
                                 cpu_lock=cpu_lock, idle_timeout_s=idle_timeout, max_frame_mb=max_frame_mb,
                                 announce=announce, fetch=tuple(fetch or ()), sha256=sha256,
                                 model_sha256=model_sha256))
    raise typer.Exit(code)


# ---- bench ----------------------------------------------------------------------------------

def _side_by_side(title: str, cols: tuple[str, ...]) -> Table:
    """A table comparing one chain in two configurations: a metric column, then right-aligned ones."""
    t = Table(title=title, title_justify="left")
    for col in cols:
        t.add_column(col, justify="right" if col != cols[0] else "left")
    return t


def _bench_swa(model_path: Path, *, stages: int, stage_threads: int, n_decode: int, reps: int, prompt_len: int,
               json_out: Optional[Path]) -> None:
    """nak bench --swa: window KV against --swa-full, side by side (nakshatra.swabench)."""
    from nakshatra.local import cached_parts
    from nakshatra.swabench import run_swa_bench

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
    from nakshatra.bench import bench_prefill_pipeline, bench_speculation
    from nakshatra.local import cached_parts

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
    """nak bench --hosts: probe, plan and measure on emulated hosts (nakshatra.hostbench)."""
    from nakshatra.hostbench import parse_hosts, run_hosts_bench

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
    speculate: Annotated[int, typer.Option("--speculate", help="Instead: speculative decoding against the same ring without it, side by side (interleaved), on the two fixed workloads (rewrite, free: nakshatra.workloads), generating up to this many tokens each; with --link-delay-ms over emulated links.")] = 0,
    pipeline_prompt: Annotated[int, typer.Option("--pipeline-prompt", help="Instead (with --speculate, in the same run): time to first token of a prompt of this many tokens through 2 stages, each pinned to its own core, fed in one n_batch chunk and pipelined in micro-batches of 512, side by side (interleaved); with --link-delay-ms over emulated links.")] = 0,
    hosts: Annotated[Optional[str], typer.Option("--hosts", help="Instead: emulate mismatched hosts with cgroup CPU quotas (root), e.g. fast=1.0,slow=0.25 (shares of one CPU); probe each, plan, and measure the planned chain against an even split side by side.")] = None,
) -> None:
    """Measure the unsplit model (one process) and a chain of local stages side by side, and as
    asked llama.cpp RPC, concurrent sessions, wire formats and emulated slow links.

    Example: [b]nak bench --rpc-baseline --link-delay-ms 10 --json bench.json[/b]
    """
    from nakshatra.bench import BenchConfig, run_bench
    from nakshatra.models import resolve_model
    from nakshatra.serve import WIRE_FORMATS

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
        from nakshatra.synthetic import cached_synthetic_llama

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


# ---- build / doctor -------------------------------------------------------------------------

@app.command()
def build(
    backend: Annotated[str, typer.Option("--backend", "-b", help="cpu, cuda, rocm, metal or vulkan.")] = "cpu",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command and CMake arguments; build nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Build even if the toolkit is not detected.")] = False,
    source: Annotated[Optional[Path], typer.Option("--source", help="Project directory (default: this checkout).")] = None,
) -> None:
    """Rebuild the extension for a backend (pip install of this project with the ggml option).

    Example: [b]nak build --backend cuda --dry-run[/b]
    """
    from nakshatra import build as b

    project = source or _project_dir()
    status = b.detect_toolkit(backend)
    err_console.print(f"backend {backend}: toolkit " + (f"found: {status.found}" if status.ok else f"MISSING: {status.missing}"),
                      markup=False)
    # a dry run shows the plan even without the toolkit; a real build needs it (or --force)
    plan = b.build_plan(backend, project, force=force or dry_run)
    err_console.print(f"cmake args: {' '.join(b.ggml_cmake_args(backend)) or '(none)'}", markup=False)
    raise typer.Exit(b.run_build(plan, dry_run=dry_run))


def _project_dir() -> Path:
    here = Path.cwd()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").exists() and (p / "patches" / "llama.cpp.pin").exists():
            return p
    raise NakError("run nak build from a Nakshatra checkout, or pass --source DIR")


@app.command()
def status(
    cluster: Annotated[Optional[Path], typer.Argument(help="A cluster file (nak up): its stages and replicas.", show_default=False)] = None,
    chain: Annotated[Optional[str], typer.Option("--chain", "-c", help="Stages host:port,host:port,... (replicas included).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
    key_file: KeyFile = "",
) -> None:
    """Health of every stage of a chain: serving or replica (per layer range, the healthiest
    serves), sessions, queue, KV in use, memory, CPU (average since start, % of one core), uptime
    and the health score (lower is healthier).

    Examples: [b]nak status --chain 127.0.0.1:7071,127.0.0.1:7072,127.0.0.1:7081[/b];
    [b]nak status cluster.toml[/b]
    """
    from nakshatra import _nakshatra
    from nakshatra.chain import health_score, parse_stage_address
    from nakshatra.ranges import LayerRange

    if (cluster is None) == (chain is None):
        raise NakError("give a cluster file (nak status cluster.toml) or --chain host:port,host:port,...")
    cf = None
    if cluster is not None:
        from nakshatra.cluster import load_cluster

        cf = load_cluster(cluster)
        addresses = cf.addresses()
    else:
        addresses = [a for a in chain.split(",") if a.strip()]
    key = cluster_key(key_file, cf)
    rows = []
    for text in addresses:
        host, port = parse_stage_address(text)
        row = {"address": f"{host}:{port}", "up": False}
        try:
            c = _nakshatra.StageClient(host, port, timeout_ms=3000, connect_timeout_ms=2000, key=key or b"")
            try:
                h = c.hello(client_name="nak-status")
            finally:
                c.close()
            row.update(up=True, layers=str(LayerRange(h["layer_start"], h["layer_end"])),
                       range=(h["layer_start"], h["layer_end"]), model=h["model_sha256"][:12],
                       health=h["health"], score=health_score(h["health"]))
        except StageError as e:
            row["error"] = str(e)
        rows.append(row)
    best: dict[tuple[int, int], str] = {}
    for r in sorted((r for r in rows if r["up"]), key=lambda r: (r["score"], r["address"])):
        best.setdefault(r["range"], r["address"])
    for r in rows:
        r["role"] = ("serving" if best.get(r.get("range")) == r["address"] else "replica") if r["up"] else "down"
    if json_out:
        print(json.dumps([{k: v for k, v in r.items() if k != "range"} for r in rows], indent=1))
        return
    t = Table(title="nak status", title_justify="left")
    # memory as the host pays it: the stage's own pages (weight copies, KV, buffers) and the
    # file-backed ones (the mmap'd slice, which the kernel can drop and read again)
    for col in ("stage", "layers", "role", "sessions", "queue", "KV used", "own MiB", "file MiB", "CPU %", "up s",
                "score"):
        t.add_column(col, justify="left" if col in ("stage", "layers", "role") else "right")
    for r in sorted(rows, key=lambda r: (r.get("range", (1 << 30, 0)), r["address"])):
        if not r["up"]:
            t.add_row(r["address"], "", "[red]down[/red]", "", "", "", "", "", "", "", r.get("error", "")[:40])
            continue
        h = r["health"]
        t.add_row(r["address"], r["layers"], r["role"], f"{h['sessions_active']}/{h['max_sessions']}",
                  str(h["queue_depth"]), f"{h['kv_tokens_used']}/{h['n_ctx_session'] * h['max_sessions']}",
                  f"{h['rss_anon_bytes'] / 2**20:.0f}", f"{h['rss_file_bytes'] / 2**20:.0f}",
                  f"{100 * h['cpu_ms'] / max(1, h['uptime_ms']):.0f}",
                  f"{h['uptime_ms'] / 1e3:.0f}", f"{r['score']:.2f}")
    # piped output is not cut to 80 columns: one line per stage
    Console(width=None if sys.stdout.isatty() else 160).print(t)


@app.command()
def soak(
    model: Annotated[str, typer.Option("--model", "-m", help="A GGUF file or a built-in name.")] = "smollm2",
    parts: Annotated[int, typer.Option("--parts", help="Local stages.")] = 3,
    sessions: Annotated[int, typer.Option("--sessions", help="Concurrent sessions per round.")] = 16,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens each session generates.")] = 256,
    minutes: Annotated[float, typer.Option("--minutes", help="How long to keep starting rounds.")] = 10.0,
    batching: Annotated[bool, typer.Option("--batching/--no-batching", help="Batch sessions (outputs then need not equal their runs alone).")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON to this file.")] = None,
) -> None:
    """Load test: rounds of concurrent sessions through a local chain; every session must finish,
    equal its run alone (batching off), and no stage may grow in memory (>5%) or file descriptors.

    Example: [b]nak soak --sessions 16 --tokens 256 --minutes 10[/b]
    """
    from nakshatra.models import resolve_model
    from nakshatra.soak import run_soak

    with err_console.status("soak ...") as st:
        res = run_soak(resolve_model(model), parts=parts, sessions=sessions, n_tokens=tokens,
                       duration_s=minutes * 60, batching=batching, status=lambda t: st.update(f"soak: {t} ..."))
    err_console.print(f"{res['rounds']} rounds, {res['sessions_completed']} sessions completed, "
                      f"{len(res['errors'])} errors, {res['mismatches']} outputs unlike their run alone; "
                      f"RSS growth {', '.join(f'{g:+.1%}' for g in res['rss_growth'])}; "
                      f"fd growth {', '.join(f'{g:+d}' for g in res['fd_growth'])}", markup=False)
    for e in res["errors"][:5]:
        err_console.print(f"  {e}", markup=False)
    for i, new in enumerate(res.get("fd_new", [])):
        if new:
            err_console.print(f"  stage {i}: descriptors opened since the first round: {', '.join(new)}", markup=False)
    if json_out:
        json_out.write_text(json.dumps(res, indent=1) + "\n")
    if not res["ok"]:
        raise NakError("soak failed (see above)")


@app.command()
def doctor() -> None:
    """Show the compiled backends, llama.cpp commit, patch set and protocol version.

    Example: [b]nak doctor[/b]
    """
    from nakshatra import build as b

    info = b.compiled_info()
    t = Table(show_header=False)
    t.add_column("what", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_row("backend (built for)", str(info["backend"]))
    t.add_row("ggml backends", ", ".join(info["ggml_backends"]))
    t.add_row("llama.cpp commit", str(info["llama_commit"]))
    t.add_row("patch set (sha256)", str(info["patch_hash"]))
    for name in str(info.get("patches", "")).split(","):
        if name:
            t.add_row("  patch", name)
    t.add_row("protocol version", str(info["protocol_version"]))
    t.add_row("system", str(info.get("system_info", "")).strip())
    Console().print(t)


# commands kept in their own modules; each module's register(app) adds them
from . import cmd_api, cmd_cluster, cmd_discover, cmd_plan  # noqa: E402

for _mod in (cmd_api, cmd_cluster, cmd_discover, cmd_plan):
    _mod.register(app)


def main() -> None:
    """Entry point: run the app, turning NakError into one red line and exit code 1."""
    try:
        app(prog_name="nak")
    except NakError as e:
        if _state["debug"]:
            err_console.print_exception()
        err_console.print(Text.assemble(("error: ", "bold red"), str(e)), highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
