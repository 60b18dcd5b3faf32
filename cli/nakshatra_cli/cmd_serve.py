"""``nak keygen`` and ``nak serve``: write a cluster key, serve one slice as a stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import Ctx, KeyFile, Threads, app, err_console


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
    from nakshatra.server.serve import ServeOptions, serve as do_serve

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
