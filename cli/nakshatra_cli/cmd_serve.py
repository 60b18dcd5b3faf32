"""``nak keygen`` and ``nak serve``: write a cluster key, serve one slice as a stage."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nakshatra.server.options import ServeOptions, option_fields

from .app import app, err_console


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

def _typer_param(f: dataclasses.Field) -> inspect.Parameter:
    """One ServeOptions field as a Typer parameter: same flags, help and default."""
    m = f.metadata
    if not m["flags"] and not m["negative"]:  # the model: the one positional argument
        return inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 annotation=Annotated[str, typer.Argument(help=m["help"])])
    kind: Any = {"int": int, "str": str, "bool": bool}.get(f.type, str)
    decls = list(m["flags"])
    if m["negative"]:
        decls = [f"{decls[0]}/{m['negative']}"] if decls else [f"--{f.name.replace('_', '-')}/{m['negative']}"]
    if f.name == "announce":
        kind = Optional[bool]
    elif f.name == "fetch":
        kind = Optional[list[str]]
    elif f.type == "str | None":
        kind = Optional[str]
    default = None if f.name == "fetch" else f.default
    opt = typer.Option(*decls, help=m["help"], envvar=m["envvar"])
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, opt])


def _serve(**kw: Any) -> None:
    """Serve one slice as a stage (C++ event loop; Ctrl-C stops it).

    Examples: [b]nak serve slices/smollm2.0-9.gguf --port 7071[/b];
    [b]nak serve model.gguf --layers 0-15 --port 7071[/b];
    [b]nak serve http://10.0.0.5:7070/slices/model.gguf --layers 16-31[/b] (fetches only those layers)
    """
    from nakshatra.server.serve import serve as do_serve

    kw["fetch"] = tuple(kw.get("fetch") or ())
    raise typer.Exit(do_serve(ServeOptions(**kw)))


# nak serve's parameters are ServeOptions' fields (nakshatra/server/options.py, the one definition)
_params = [_typer_param(f) for f in option_fields()]
_serve.__signature__ = inspect.Signature(_params, return_annotation=None)  # type: ignore[attr-defined]
_serve.__annotations__ = {p.name: p.annotation for p in _params}
serve = app.command("serve")(_serve)
