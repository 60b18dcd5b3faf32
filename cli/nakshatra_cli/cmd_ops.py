"""``nak build``, ``nak status``, ``nak soak`` and ``nak doctor``: rebuild the extension for a
backend, the health of a chain's stages, a load test, what was compiled."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from nakshatra.errors import NakError, StageError

from .app import KeyFile, app, cluster_key, err_console


@app.command()
def build(
    backend: Annotated[str, typer.Option("--backend", "-b", help="cpu, cuda, rocm, metal or vulkan.")] = "cpu",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the commands and CMake arguments; build nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Build even if the toolkit is not detected.")] = False,
    source: Annotated[Optional[Path], typer.Option("--source", help="Project directory (default: this checkout).")] = None,
    cmake_arg: Annotated[Optional[list[str]], typer.Option(
        "--cmake-arg", "-D", help="Extra argument for llama.cpp's configure, repeatable, e.g. "
        "-D CMAKE_CUDA_ARCHITECTURES=86 (a leading -D may be left out).")] = None,
) -> None:
    """Rebuild the extension for a backend (pip install of this project with the ggml option).
    The compiled llama.cpp is cached per backend and options, so a second build is quick.

    Examples: [b]nak build --backend cuda[/b]; [b]nak build --backend cuda -D CMAKE_CUDA_ARCHITECTURES=86 --dry-run[/b]
    """
    from nakshatra import build as b

    project = source or _project_dir()
    extra = [a if a.startswith("-") else f"-D{a}" for a in cmake_arg or []]
    # a dry run shows the plan even without the toolkit; a real build needs it (or --force)
    plan = b.build_plan(backend, project, extra, force=force or dry_run)
    for line in b.plan_report(plan):
        err_console.print(line, markup=False)
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
    from nakshatra.client.chain import health_score, parse_stage_address
    from nakshatra.ranges import LayerRange

    if (cluster is None) == (chain is None):
        raise NakError("give a cluster file (nak status cluster.toml) or --chain host:port,host:port,...")
    cf = None
    if cluster is not None:
        from nakshatra.cluster.config import load_cluster

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
    from nakshatra.bench.soak import run_soak
    from nakshatra.gguf.models import resolve_model

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
    devices = info.get("devices", [])
    t.add_row("GPU devices", "; ".join(f"{d['name']}: {d['description']}, {d['memory_bytes'] / 2**30:.0f} GiB"
                                       for d in devices) or f"none{b.no_device_hint(str(info['backend']))}")
    t.add_row("llama.cpp commit", str(info["llama_commit"]))
    t.add_row("patch set (sha256)", str(info["patch_hash"]))
    for name in str(info.get("patches", "")).split(","):
        if name:
            t.add_row("  patch", name)
    t.add_row("protocol version", str(info["protocol_version"]))
    t.add_row("system", str(info.get("system_info", "")).strip())
    Console().print(t)
