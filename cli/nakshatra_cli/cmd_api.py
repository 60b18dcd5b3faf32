"""``nak api`` (OpenAI-compatible server + dashboard) and ``nak chat`` (a conversation in the
terminal)."""


import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from nakshatra.errors import NakError

from .app import SAMPLER, STAGE, Ctx, KeyFile, Threads, app, cluster_key, err_console

Targets = dict[str, list[tuple[str, dict]]]
"""Per model name, each stage's prepare request for a swap (nakshatra.client.swap), by address."""


def _cluster_targets(cf) -> Targets:
    """Every model of a cluster file, each stage (replicas too) with its layers of it."""
    out: Targets = {}
    for m in cf.all_models():
        src = str(cf.resolve(m.model)) if m.model.endswith(".gguf") else m.model
        rows = []
        for i, (st, rng) in enumerate(zip(cf.stages, m.layers)):
            slice_file = cf.slices_path / m.slices[i] if i < len(m.slices) and m.slices[i] else None
            spec = ({"model": str(slice_file), "layers": rng.inclusive()} if slice_file and slice_file.is_file()
                    else {"model": src, "layers": rng.inclusive()})
            rows.extend((a, spec) for a in [st.address, *st.replicas])
        out[m.name] = rows
    return out


def _local_targets(addresses: list[str], slices: list[Path]) -> list[tuple[str, dict]]:
    """Local stages' prepare requests: stage i loads slice i (cut already)."""
    from nakshatra.gguf.slicer import read_slice_meta
    from nakshatra.ranges import LayerRange

    rows = []
    for a, p in zip(addresses, slices):
        meta = read_slice_meta(p)
        rng = LayerRange(int(meta["nakshatra.layer_range_start"]), int(meta["nakshatra.layer_range_end"]))
        rows.append((a, {"model": str(p), "layers": rng.inclusive()}))
    return rows


def _model_id(model: str) -> str:
    return model if not model.endswith(".gguf") else Path(model).stem


@contextlib.contextmanager
def chain_addresses(model: str, parts: int, chain: Optional[str], cluster: Optional[Path], discover: bool,
                    discover_timeout: float, threads: int, ctx: int, max_sessions: int,
                    key_file: str, model_sha: Optional[str] = None,
                    also: Optional[list[str]] = None) -> Iterator[tuple[list[str], str, Targets]]:
    """The stage addresses to use, a model id and every model the stages can be swapped to, the
    started one included (a cluster file's ``[[models]]``, or ``also``: more models for local
    stages, cut into as many parts): ``--chain``, a cluster file, ``--discover``, or local stages of
    ``model`` cut in ``parts`` (started here, stopped on exit)."""
    chosen = sum(bool(x) for x in (chain, cluster, discover))
    if chosen > 1:
        raise NakError("give only one of --chain, --cluster and --discover")
    if also and chosen:
        raise NakError("--also names models for the local stages nak api starts; for a cluster file, list them "
                       "as [[models]] (docs/cluster.md)")
    if chain:
        yield [a for a in chain.split(",") if a.strip()], "", {}
        return
    if cluster:
        from nakshatra.cluster.config import load_cluster

        cf = load_cluster(cluster)
        yield cf.addresses(), cf.model_id, _cluster_targets(cf)
        return
    if discover:
        from nakshatra.cluster.discovery import discover_chain

        yield discover_chain(timeout_s=discover_timeout, model_sha256=model_sha), "", {}
        return
    from nakshatra.gguf.models import resolve_model
    from nakshatra.server.local import LocalStages, cached_parts

    tty = sys.stderr.isatty()
    slices = cached_parts(resolve_model(model), parts, progress=tty)
    others = {}
    for m in also or []:
        if _model_id(m) in others or _model_id(m) == _model_id(model):
            raise NakError(f"--also {m}: a model of that name is given already")
        others[_model_id(m)] = cached_parts(resolve_model(m), parts, progress=tty)
    with LocalStages(slices, threads=threads, ctx=ctx, max_sessions=max_sessions, key_file=key_file or None) as ls:
        targets = {_model_id(model): _local_targets(ls.addresses, slices)} if others else {}
        targets.update({n: _local_targets(ls.addresses, sl) for n, sl in others.items()})
        yield ls.addresses, _model_id(model), targets


# where the chain comes from, shared by api and chat
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="A GGUF file or a built-in name (without --chain/--cluster/--discover: local stages).")]
PartsOpt = Annotated[int, typer.Option("--parts", "-p", help="Local stages to cut the model into.")]
ChainOpt = Annotated[Optional[str], typer.Option("--chain", help="Running stages host:port,... (replicas allowed).")]
ClusterOpt = Annotated[Optional[Path], typer.Option("--cluster", help="A cluster file (`nak plan`, `nak up`): its stages, and its key_file unless --key-file is given.")]
DiscoverOpt = Annotated[bool, typer.Option("--discover", help="Build the chain from stages announcing themselves on the LAN (mDNS).")]


def _key(key_file: str, cluster: Optional[Path]) -> bytes | None:
    """The key for the stages: --key-file, else the --cluster file's key_file, else $NAK_KEY."""
    from nakshatra.cluster.config import load_cluster

    return cluster_key(key_file, load_cluster(cluster) if cluster else None)


@app.command()
def api(
    model: ModelOpt = "smollm2",
    parts: PartsOpt = 3,
    chain: ChainOpt = None,
    cluster: ClusterOpt = None,
    discover: DiscoverOpt = False,
    discover_timeout: Annotated[float, typer.Option("--discover-timeout", help="Seconds to listen for stages.")] = 3.0,
    model_sha: Annotated[Optional[str], typer.Option("--model-sha", help="With --discover: the model's sha256 (a prefix will do) when stages of several models answer.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address the HTTP server listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="HTTP port (0: any free one).")] = 8080,
    model_id: Annotated[str, typer.Option("--model-id", help="The model name clients send (default: the --model name, or the cluster file's).")] = "",
    parallel: Annotated[int, typer.Option("--parallel", "-np", help="Requests served at once (each a session on every stage, kept between requests as a prompt cache).")] = 4,
    threads: Threads = 0,
    ctx: Ctx = STAGE.ctx,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds a stage may go without answering or making progress before its range fails over (a slow stage that computes is waited for).")] = 60.0,
    key_file: KeyFile = "",
    draft_max: Annotated[int, typer.Option("--draft-max", help="Speculative decoding: the last stage drafts up to this many tokens per window with llama.cpp's n-gram drafter; 0 turns it off. A stage grants at most 8.")] = 0,
    also: Annotated[Optional[list[str]], typer.Option("--also", help="Local stages: another model (a built-in name or GGUF) they can be swapped to, cut into as many parts; repeatable.")] = None,
    auto_swap: Annotated[bool, typer.Option("--auto-swap", help="A request naming an available model that is not loaded swaps the stages to it first (as Ollama loads by name).")] = False,
    swap_wait: Annotated[float, typer.Option("--swap-wait", help="Seconds a request arriving during a model swap waits before a 503 with Retry-After.")] = 30.0,
    drain: Annotated[float, typer.Option("--drain", help="Seconds a model swap waits for running generations before it ends them (with their text so far).")] = 60.0,
) -> None:
    """OpenAI-compatible HTTP API and live dashboard over a chain (local stages by default).

    Serves /v1/models, /v1/completions, /v1/chat/completions (stream: true for server-sent
    events), /health, /metrics (Prometheus) and the dashboard at /. A conversation resent in
    full each turn reuses the stages' KV cache for the common prefix.

    Examples: [b]nak api[/b] (SmolLM2 in 3 local stages at http://127.0.0.1:8080);
    [b]nak api --chain hostA:7071,hostB:7072 --host 0.0.0.0 --model-id my-model[/b];
    then [b]curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'[/b]
    """
    from nakshatra.client.api import serve_api
    from nakshatra.client.engine import Engine

    def on_term(signum, frame) -> None:
        raise KeyboardInterrupt  # uvicorn re-raises SIGTERM after its shutdown: stop local stages too

    signal.signal(signal.SIGTERM, on_term)
    key = _key(key_file, cluster)
    if model_sha and not discover:
        raise NakError("--model-sha picks the model of discovered stages: add --discover")
    if swap_wait < 0 or drain < 0:
        raise NakError("--swap-wait and --drain are seconds, >= 0")
    with chain_addresses(model, parts, chain, cluster, discover, discover_timeout, threads, ctx, parallel,
                         key_file, model_sha, also) as (addresses, default_id, targets):
        engine = Engine(addresses, model_id="", parallel=parallel, key=key, timeout_s=timeout, draft_max=draft_max)
        engine.model_id = model_id or default_id or f"{engine.arch}-{engine.model_sha256[:8]}"
        if default_id in targets and engine.model_id != default_id:  # --model-id renames the started model
            targets[engine.model_id] = targets.pop(default_id)
        engine.models = targets
        engine.available = [n for n in targets if n != engine.model_id]
        engine.auto_swap, engine.swap_wait_s, engine.drain_s = auto_swap, swap_wait, drain
        try:
            def ready(url: str) -> None:
                err_console.print(f"nak api: model [b]{engine.model_id}[/b] on {len(addresses)} stages; "
                                  f"listening on {url} (dashboard: {url}/)", highlight=False)
                print(url, flush=True)

            serve_api(engine, host=host, port=port, ready=ready)
        finally:
            engine.close()

@app.command()
def chat(
    model: ModelOpt = "smollm2",
    parts: PartsOpt = 3,
    chain: ChainOpt = None,
    cluster: ClusterOpt = None,
    discover: DiscoverOpt = False,
    system: Annotated[str, typer.Option("--system", help="A system message.")] = "",
    n_predict: Annotated[int, typer.Option("--n-predict", "-n", help="Most tokens per answer.")] = 512,
    temp: Annotated[float, typer.Option("--temp", help="Temperature; 0 is greedy.")] = SAMPLER.temp,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Sampling seed (default: random).")] = None,
    threads: Threads = 0,
    ctx: Ctx = STAGE.ctx,
    key_file: KeyFile = "",
) -> None:
    """An interactive conversation in the terminal; each turn reuses the KV cache of the
    conversation so far (only the new turn is prefilled). Empty line or Ctrl-D ends it.

    Examples: [b]nak chat[/b]; [b]nak chat --chain hostA:7071,hostB:7072 --system "Be brief."[/b]
    """
    from rich.console import Console

    from nakshatra.client.chain import SamplerParams
    from nakshatra.client.engine import ApiError, Engine, GenRequest

    key = _key(key_file, cluster)
    out = Console()
    with chain_addresses(model, parts, chain, cluster, discover, 3.0, threads, ctx, 1, key_file) as (addresses, _, _targets):
        engine = Engine(addresses, model_id="chat", parallel=1, key=key)
        turns: list[tuple[str, str]] = [("system", system)] if system else []
        try:
            while True:
                try:
                    line = out.input("[bold green]you>[/bold green] ")
                except EOFError:
                    break
                if not line.strip():
                    break
                turns.append(("user", line))
                tokens = engine.tokenize(engine.chat_prompt(turns), special=True)
                room = engine.n_ctx - len(tokens)
                if room < 1:
                    raise NakError(f"the conversation ({len(tokens)} tokens) no longer fits --ctx {engine.n_ctx}")
                req = GenRequest(tokens, min(n_predict, room), SamplerParams(temp=temp, seed=seed))
                out.print("[bold cyan]model>[/bold cyan] ", end="")
                try:
                    res = engine.generate(req, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
                except ApiError as e:
                    raise NakError(e.message) from None
                sys.stdout.write("\n")
                turns.append(("assistant", res.text))
                err_console.print(f"[dim]{res.n_completion} tokens, {res.n_reused} of {res.n_prompt} prompt "
                                  f"tokens from the cache[/dim]")
        finally:
            engine.close()
