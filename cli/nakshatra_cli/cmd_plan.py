"""`nak plan`: choose the layer ranges of a cluster (nakshatra.cluster.plan)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app, cluster_key

_HOST_HELP = ("A host: NAME=ADDRESS,mem=MiB,speed=LAYERS_PER_S,link=MS (repeat for each host). mem: MiB a stage may "
              "use there (or 16G); speed: layers x tokens per second from `nak plan MODEL --probe` on that host; "
              "link: its one-way network latency, ms (half a ping round trip; default 0).")


def _model_ref(model: str, model_path: Path, out_dir: Path) -> str:
    """What the cluster file names: a built-in name or an hf:/ollama: reference as is, else the
    GGUF's path relative to the file's folder when it lies under it, else absolute."""
    from nakshatra.gguf.hub import is_ref
    from nakshatra.gguf.models import BUILTIN

    if (model in BUILTIN or is_ref(model)) and not Path(model).is_file():
        return model
    p, base = model_path.absolute(), out_dir.absolute()  # not resolved: a snapshot's shards are found by name
    return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)


@app.command("plan")
def plan(
    model: Annotated[Optional[str], typer.Argument(help="A GGUF file or a built-in name (smollm2, gemma3-270m); default: the --cluster file's model.")] = None,
    host: Annotated[Optional[list[str]], typer.Option("--host", "-H", help=_HOST_HELP)] = None,
    cluster: Annotated[Optional[Path], typer.Option("--cluster", help="A cluster file whose \\[\\[hosts]] (and model, key_file, \\[options]) to plan with; --host adds hosts.")] = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", "-c", help="KV positions per session.", show_default="the cluster file's, else 4096")] = None,
    max_sessions: Annotated[Optional[int], typer.Option("--max-sessions", help="Concurrent sessions per stage, each with ctx KV positions.", show_default="the cluster file's, else 8")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="ring (the last stage hands each token back to the first: that hop counts) or forwarding.", show_default="the cluster file's, else ring")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the cluster file here (else it goes to stdout).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --output file.")] = False,
    port: Annotated[Optional[int], typer.Option("--port", help="Port of each stage; a second stage on the same address gets port+1, and so on.", show_default="the cluster file's lowest stage port, else 7071")] = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help="Running stages host:port,... whose hosts to plan with: each reports its free memory and its speed from a self-benchmark at start.")] = None,
    stages_link: Annotated[float, typer.Option("--stages-link", help="One-way link latency (ms) to assume for the --stages hosts.")] = 0.5,
    probe: Annotated[bool, typer.Option("--probe", help="Measure THIS machine for MODEL (free memory, layers/s; about 5 s) and print it as a --host value and a \\[\\[hosts]] entry.")] = False,
    key_file: Annotated[str, typer.Option("--key-file", help="Cluster key from `nak keygen` for the --stages handshakes (default: the --cluster file's key_file, else $NAK_KEY); the cluster file written names it as its key_file.")] = "",
    add_model: Annotated[Optional[str], typer.Option("--add-model", help="With --cluster: plan MODEL on the file's own stages (one range each, fitting beside the model they serve) and write the file again with a \\[\\[models]] entry of this name, which nak api can swap to.")] = None,
) -> None:
    """Plan a cluster: assign contiguous layer ranges to hosts so a token takes the least time, within each host's memory; write the cluster file and print the [b]nak slice[/b] command.

    [b]Memory[/b] of a stage = its predicted footprint (as nak inspect): its layers' tensors (exact sizes from the GGUF) + their f16 KV cache for ctx x max-sessions positions + the token embedding rows a context touches (first stage) + output norm and LM head (last stage; a tied model's last stage holds the token embedding as its LM head) + global tensors + a fixed cost per stage kind (llama.cpp's compute and output buffers and heap from no_alloc estimates, the process baseline). It must fit the host's mem.

    [b]Latency[/b] per token (ms) = sum over stages of 1000 x layers / speed + link(a) + link(b) for each hop between consecutive stages a, b + in ring mode the hop from the last stage back to the first. One session; in forwarding mode the client's own hops are not counted.

    [b]Choice[/b]: the exact minimum over every ordered subset of the hosts and every split of the layers (a dynamic program, checked against brute force in the tests); a host given no layers is left out and the table says why; equal latencies go to fewer stages.

    Example: [b]nak plan model.gguf --host pc=10.0.0.5,mem=16000,speed=950,link=0.5 --host mac=10.0.0.6,mem=12G,speed=600,link=0.5 -o cluster.toml[/b] after [b]nak plan model.gguf --probe[/b] on each host (it prints that host's --host value).
    Or from running stages (each measures itself at start): [b]nak plan model.gguf --stages 10.0.0.5:7071,10.0.0.6:7071 -o cluster.toml[/b]; keyed stages need [b]--key-file[/b] (else the --cluster file's key_file, else $NAK_KEY), and the cluster file written names that key file.
    """
    from rich.console import Console

    from nakshatra.cluster.config import dump_cluster, load_cluster
    from nakshatra.cluster.plan import (
        host_arg,
        host_toml,
        left_out_lines,
        model_memory,
        parse_host,
        plan_chain,
        plan_cluster,
        probe_host,
        render_plan,
        slice_command,
        stage_downloads,
    )
    from nakshatra.errors import NakError
    from nakshatra.gguf.models import resolve_model

    err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    cf = load_cluster(cluster) if cluster is not None else None
    if model is None:
        if cf is None:
            raise NakError("give a MODEL (a GGUF file or a built-in name) or a --cluster file that names one")
        model = cf.model
        model_path = resolve_model(cf.model if cf.model in _builtin() or _is_ref(cf.model) else cf.resolve(cf.model))
    else:
        model_path = resolve_model(model)

    if probe:
        pr = probe_host(model_path)
        err.print(f"{model_path.name}: {pr.n_layer} layers, fastest decode step {pr.decode_ms:.2f} ms "
                  f"({pr.runs} runs of 16) → {pr.host.layers_per_s:g} layers/s; {pr.host.memory_mb:g} MiB "
                  f"available. link={pr.host.link_ms:g} ms is a guess for a wired LAN: put half the ping "
                  "round trip to the other hosts there. Paste one of:", markup=False, highlight=False)
        print(f"--host {host_arg(pr.host)}\n")
        print(host_toml(pr.host), end="")
        return

    opts = cf.options if cf is not None else {}
    ctx = ctx if ctx is not None else int(opts.get("ctx", 4096))
    max_sessions = max_sessions if max_sessions is not None else int(opts.get("max_sessions", 8))
    mode = mode if mode is not None else str(opts.get("mode", "ring"))
    if port is None:
        port = min((st.port for st in cf.stages), default=7071) if cf is not None else 7071
    hosts = (list(cf.hosts) if cf is not None else []) + [parse_host(h) for h in host or []]
    if stages:
        from nakshatra.cluster.plan import hosts_from_stages

        hosts += hosts_from_stages([a for a in stages.split(",") if a.strip()], key=cluster_key(key_file, cf),
                                   link_ms=stages_link)
    if output is not None and output.exists() and not force:
        raise NakError(f"{output} exists; give --force to overwrite it, or another -o")

    if add_model is not None:
        if cf is None or model is None:
            raise NakError("--add-model plans MODEL on a cluster file's stages: give MODEL and --cluster")
        _add_model(cf, add_model, model, model_path, hosts, ctx, max_sessions, mode, output, err)
        return
    mem = model_memory(model_path, ctx=ctx, max_sessions=max_sessions)
    result = plan_chain(mem, hosts, mode)
    err.print(render_plan(result, stage_downloads(model_path, result)))
    for line in left_out_lines(result):
        err.print(line, markup=False, highlight=False)

    out_dir = output.parent if output is not None else Path(".")
    # the key file the new cluster names: --key-file, else the --cluster file's
    kf = Path(key_file).resolve() if key_file else (cf.resolve(cf.key_file).resolve() if cf is not None and cf.key_file else None)
    key_ref = "" if kf is None else (str(kf.relative_to(out_dir.resolve())) if kf.is_relative_to(out_dir.resolve()) else str(kf))
    new = plan_cluster(result, _model_ref(model, model_path, out_dir), model_path, ctx=ctx,
                       max_sessions=max_sessions, base_port=port, hosts=hosts, key_file=key_ref)
    cmd = slice_command(model_path, result, out_dir / new.slices_dir)
    header = (f"written by `nak plan`: {result.mode}, ctx {ctx} x {max_sessions} sessions; expected "
              f"{result.total_ms:.2f} ms per token (compute {result.compute_ms:.2f} + links {result.link_ms:.2f})\n"
              f"make the slices: {cmd}")
    text = dump_cluster(new, header=header)
    text += "" if text.endswith("\n") else "\n"
    if output is None:
        sys.stdout.write(text)
        err.print(f"next: {cmd}", markup=False, highlight=False)
        return
    tmp = output.with_name(output.name + ".tmp")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, output)
    except OSError as e:
        raise NakError(f"cannot write {output}: {e.strerror or e}") from e
    err.print(f"wrote {output}; make the slices with:", markup=False, highlight=False)
    print(cmd)


def _add_model(cf, name: str, model: str, model_path: Path, hosts: list, ctx: int, max_sessions: int, mode: str,
               output: Optional[Path], err) -> None:
    """``nak plan MODEL --cluster FILE --add-model NAME``: the ranges of MODEL on FILE's stages
    (nakshatra.cluster.plan.plan_on_stages, each beside what the stage serves now), written back as
    a [[models]] entry (to --output, else stdout)."""
    from nakshatra.cluster.config import ModelSpec, dump_cluster
    from nakshatra.cluster.plan import model_memory, plan_on_stages, render_plan
    from nakshatra.errors import NakError
    from nakshatra.gguf.models import resolve_model

    if output is not None and cf.path is not None and output.absolute().parent != cf.path.absolute().parent:
        raise NakError(f"-o {output}: write the cluster file beside {cf.path} (its paths are relative to that folder)")
    if any(m.name == name for m in cf.all_models()):
        raise NakError(f"{cf.path}: a model named {name!r} is listed already; choose another --add-model name")
    by_address = {h.address: h for h in hosts}
    stage_hosts = []
    for st in cf.stages:
        h = by_address.get(st.host)
        if h is None:
            raise NakError(f"stage {st.address} runs on {st.host}, which no [[hosts]] entry or --host describes: run "
                           f"`nak plan MODEL --probe` there and add its memory and speed")
        stage_hosts.append(h)
    current = resolve_model(cf.model if not cf.model.endswith(".gguf") else cf.resolve(cf.model))
    cur_mem = model_memory(current, ctx=ctx, max_sessions=max_sessions)
    reserved = [cur_mem.stage_bytes(st.layers) for st in cf.stages]
    result = plan_on_stages(model_memory(model_path, ctx=ctx, max_sessions=max_sessions), stage_hosts, mode, reserved)
    err.print(render_plan(result))
    out_dir = output.parent if output is not None else (cf.path.parent if cf.path else Path("."))
    cf.models.append(ModelSpec(name=name, model=_model_ref(model, model_path, out_dir), layers=result.ranges))
    text = dump_cluster(cf)
    text += "" if text.endswith("\n") else "\n"
    if output is None:
        sys.stdout.write(text)
        return
    tmp = output.with_name(output.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, output)
    except OSError as e:
        raise NakError(f"cannot write {output}: {e.strerror or e}") from e
    err.print(f"wrote {output}: model {name!r} on layers {result.ranges_text()} of its stages; "
              f"nak api --cluster {output} can swap to it (POST /api/models/{name}/load)", markup=False, highlight=False)


def _is_ref(model: str) -> bool:
    from nakshatra.gguf.hub import is_ref

    return is_ref(model)


def _builtin() -> dict:
    from nakshatra.gguf.models import BUILTIN

    return BUILTIN
