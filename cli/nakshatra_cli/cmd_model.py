"""``nak slice``, ``nak inspect`` and ``nak pull``: cut a model into slices, show what a model or
slice holds and the memory a stage needs for it, fetch a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from nakshatra.errors import NakError

from .app import app, err_console


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
    from nakshatra.gguf.models import resolve_model
    from nakshatra.gguf.slicer import model_layout, slice_model
    from nakshatra.ranges import parse_ranges

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
    from nakshatra.gguf.inspection import inspect_gguf, render_inspection
    from nakshatra.gguf.models import resolve_model

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
    from nakshatra.gguf import hub
    from nakshatra.gguf.models import pull as do_pull

    if hub.is_ref(name):
        print(hub.resolve(name, progress=True, verify=verify))
    else:
        print(do_pull(name, progress=True))
