"""`nak up` and `nak down`: start and stop the stages of a cluster file on this host
(nakshatra.cluster.up); `nak status FILE` is in cmd_ops.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from nakshatra.errors import NakError

from .app import app, err_console


@app.command()
def up(
    cluster: Annotated[Path, typer.Argument(help="The cluster file (TOML; `nak plan` writes one).")],
    this_host: Annotated[Optional[list[str]], typer.Option("--this-host", help="An address that means this machine (repeat, or comma-separate; default: localhost, loopback, this machine's name and addresses).")] = None,
    files_port: Annotated[int, typer.Option("--files-port", help="TCP port of the slice file server other hosts fetch from (0: any free port).")] = 7070,
    files_host: Annotated[str, typer.Option("--files-host", help="Address the slice file server listens on (default: 127.0.0.1 if every other host is loopback, else 0.0.0.0).")] = "",
    advertise: Annotated[str, typer.Option("--advertise", help="The address other hosts reach this machine at, for the fetch URL (default: this machine's address on the route to each host).")] = "",
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds each stage may take to load and listen.")] = 120.0,
) -> None:
    """Start the stages of a cluster file that belong on this host (detached), cutting any
    missing slice, and print for every other host the exact command to run there: it fetches
    its slice from this host (sha256-checked) and serves it. The commands go to stdout, the
    rest to stderr.

    Example: [b]nak up cluster.toml[/b], then [b]nak status cluster.toml[/b] and [b]nak down cluster.toml[/b]
    """
    from nakshatra.cluster.config import load_cluster
    from nakshatra.cluster.up import up as do_up

    cf = load_cluster(cluster)
    hosts = [h.strip() for v in (this_host or []) for h in v.split(",") if h.strip()]
    if not 0 <= files_port < 65536 or timeout <= 0:
        raise NakError("--files-port must be in 0..65535 (0: any free port) and --timeout > 0 seconds")

    def echo(text: str) -> None:
        err_console.print(text, markup=False, highlight=False)

    res = do_up(cf, this_hosts=hosts, files_port=files_port, files_host=files_host, advertise=advertise,
                timeout_s=timeout, progress=sys.stderr.isatty(), echo=echo)
    if res.started:
        t = Table(title=f"nak up {cluster}: started on this host", title_justify="left")
        for col in ("process", "pid", "log"):
            t.add_column(col, overflow="fold")
        for p in res.started:
            t.add_row(p["what"], str(p["pid"]), p["log"])
        err_console.print(t)
    else:
        echo(f"nak up {cluster}: no stage of it runs on this host (addresses here: see --this-host)")
    if res.remote:
        files = next(p for p in res.started if p["kind"] == "files")
        echo(f"\nrun on each other host (it fetches its slice from this host's file server on port {files['port']}, "
             "checks its sha256 and serves):")
        if cf.key_file:
            echo(f"copy the cluster key {cf.resolve(cf.key_file)} to each of them first, over a secure channel "
                 f"(as {cf.key_file}); it is never served")
        elif os.environ.get("NAK_KEY"):
            echo("the stages here use the cluster key in $NAK_KEY: set the same NAK_KEY on each of them")
        for inst, cmd in res.remote:
            role = f"replica of {inst.replica_of}" if inst.replica_of else "stage"
            print(f"# on {inst.host}: {role} {inst.address}, layers {inst.layers.inclusive()}")
            print(cmd)
        sys.stdout.flush()
    echo(f"\nthen: {res.client}\nhealth: nak status {cluster}    stop: nak down {cluster}")

@app.command()
def down(
    cluster: Annotated[Path, typer.Argument(help="The cluster file given to `nak up`.")],
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait after SIGTERM before SIGKILL.")] = 10.0,
) -> None:
    """Stop what `nak up` started on this host from a cluster file (its stages and the slice
    file server: SIGTERM, then SIGKILL after --timeout) and forget it.

    Example: [b]nak down cluster.toml[/b]
    """
    from nakshatra.cluster.up import down as do_down

    done = do_down(cluster, timeout_s=timeout)
    if not done:
        err_console.print(f"nak down {cluster}: nothing is up from it on this host", markup=False)
        return
    t = Table(title=f"nak down {cluster}", title_justify="left")
    for col in ("process", "pid", "stopped"):
        t.add_column(col)
    how = {"term": "yes", "kill": "yes (SIGKILL)", "gone": "was not running"}
    for p in done:
        t.add_row(p["what"], str(p["pid"]), how.get(p["stopped"], p["stopped"]))
    err_console.print(t)
