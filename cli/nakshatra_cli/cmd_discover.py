"""``nak discover``: list the stages that announce themselves on the LAN (DNS-SD over mDNS,
``_nakshatra._tcp``; see nakshatra.cluster.discovery) and the chain ``nak run --discover`` would build.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from nakshatra.errors import NakError

from .app import app


@app.command("discover")
def discover(
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to listen for stages.")] = 2.0,
    model_sha: Annotated[Optional[str], typer.Option("--model-sha", help="Only stages of this model (sha256, a prefix will do).")] = None,
    as_chain: Annotated[bool, typer.Option("--chain", help="Print only the --chain string (host:port,...) to stdout; fail if the chain is incomplete.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stages (and the chain, or why there is none) as JSON.")] = False,
    interface: Annotated[Optional[list[str]], typer.Option("--interface", "-i", help="IPv4 address of an interface to ask on (repeatable; default: all).")] = None,
) -> None:
    """List the stages announcing on the LAN (mDNS, _nakshatra._tcp) and the chain they form.

    Stages announce with [b]nak serve ... --host <LAN address>[/b] (or [b]--announce[/b] on
    loopback). Examples: [b]nak discover[/b];
    [b]nak run --chain $(nak discover --chain) "prompt"[/b] (same as [b]nak run --discover[/b])
    """
    from nakshatra.cluster.discovery import chain_from, discover as do_discover

    err = Console(stderr=True)
    spinner = sys.stderr.isatty() and not as_json
    with err.status(f"listening for stages ({timeout:g} s) ...") if spinner else nullcontext():
        found = do_discover(timeout, model_sha, interfaces=interface or None)
    chain: list[str] = []
    problem = ""
    try:
        chain = chain_from(found, model_sha)
    except NakError as e:
        if as_chain:
            raise
        problem = str(e)
    if as_chain:
        print(",".join(chain))
        return
    if as_json:
        print(json.dumps({"stages": [f.as_dict() for f in found], "chain": chain, "error": problem or None}, indent=1))
        return
    t = Table(title=f"nak discover: {len(found)} stage{'s' * (len(found) != 1)} answered within {timeout:g} s",
              title_justify="left")
    for col in ("stage", "layers", "model", "arch", "key", "proto", "name"):
        t.add_column(col)
    for f in found:
        t.add_row(f.address, str(f.layers), f"{f.model_sha256[:12]} {f.model_name}".strip(), f.arch,
                  "yes" if f.key_required else "no", str(f.protocol), f.name)
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    if chain:
        err.print(f"chain: {','.join(chain)}", markup=False, highlight=False)
    else:
        err.print(f"no complete chain: {problem}", markup=False, highlight=False)
