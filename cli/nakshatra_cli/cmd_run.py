"""``nak run``: answer a prompt through a chain of stages (--chain, --discover, or local stages
of a model); only the answer goes to stdout."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.table import Table

from nakshatra.errors import NakError

from .app import SAMPLER, STAGE, Ctx, KeyFile, Threads, app, err_console


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    model: Annotated[str, typer.Option("--model", "-m", help="A GGUF file or a built-in name (smollm2, gemma3-270m).")] = "smollm2",
    parts: Annotated[int, typer.Option("--parts", "-p", help="Local stages to cut the model into (without --chain).")] = 3,
    chain: Annotated[Optional[str], typer.Option("--chain", help="Running stages, host:port,host:port,... in any order.")] = None,
    n_predict: Annotated[int, typer.Option("--n-predict", "-n", help="Tokens to generate (-1: until end of generation).")] = 128,
    temp: Annotated[float, typer.Option("--temp", help="Temperature; 0 is greedy.")] = SAMPLER.temp,
    top_k: Annotated[int, typer.Option("--top-k")] = SAMPLER.top_k,
    top_p: Annotated[float, typer.Option("--top-p")] = SAMPLER.top_p,
    min_p: Annotated[float, typer.Option("--min-p")] = SAMPLER.min_p,
    repeat_penalty: Annotated[float, typer.Option("--repeat-penalty", help="1 disables it.")] = SAMPLER.repeat_penalty,
    repeat_last_n: Annotated[int, typer.Option("--repeat-last-n")] = SAMPLER.repeat_last_n,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Sampling seed (default: random).")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--raw", help="--chat (the default when the model has a chat template): the prompt is one user turn in the model's chat template, as ollama run and llama-cli do. --raw: continue the prompt as plain text (llama-completion -no-cnv).", show_default=False)] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print timings per stage to stderr.")] = False,
    forwarding: Annotated[bool, typer.Option("--forwarding/--relay", help="Stages pass hidden states to each other (forwarding) or through the client (relay).")] = False,
    ring: Annotated[bool, typer.Option("--ring", help="Forwarding, and the last stage hands each token straight back to the first.")] = False,
    draft_max: Annotated[int, typer.Option("--draft-max", help="Speculative decoding: the last stage drafts up to this many tokens per window with llama.cpp's n-gram drafter (prompt lookup) and the chain verifies them in one trip; 0 turns it off. A stage grants at most 8.")] = 0,
    threads: Threads = 0,
    ctx: Ctx = STAGE.ctx,
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
    from nakshatra.client.chain import Chain, GenerationStats, SamplerParams

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
        from nakshatra.cluster.discovery import discover_chain

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
    from nakshatra.gguf.models import resolve_model
    from nakshatra.server.local import LocalStages, cached_parts

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
