"""The Typer app of ``nak`` and what its command modules share: the global options (--debug,
--verbose), the option types several commands take (Threads, Ctx, KeyFile), the stderr console
and :func:`cluster_key`.

Each ``cmd_*`` module defines its commands at module level on :data:`app`; importing it adds
them. :mod:`nakshatra_cli.main` imports them all, in the order ``nak --help`` lists them.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

from nakshatra.client.chain import SamplerParams
from nakshatra.server.options import DEFAULTS

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

# the defaults of the sampler and of a stage, from their one definition each (the C++ structs,
# through nakshatra.client.chain.SamplerParams and nakshatra.server.options.ServeOptions)
SAMPLER = SamplerParams()
STAGE = DEFAULTS

Threads = Annotated[int, typer.Option("--threads", "-t", help="llama.cpp threads per stage (0: all cores for nak serve; cores shared between local stages for nak run).",
                                      envvar="NAK_THREADS")]
Ctx = Annotated[int, typer.Option("--ctx", "-c", help="KV positions per session (the stage's n_ctx is ctx x max-sessions).")]
KeyFile = Annotated[str, typer.Option("--key-file", help="Cluster key from `nak keygen` (default: $NAK_KEY, hex, if set): both ends authenticate, every frame is MACed.")]


def cluster_key(key_file: str, cluster=None) -> bytes | None:
    """The cluster key a command talks to stages with: ``--key-file`` (``key_file``), else the
    ``key_file`` of the cluster file ``cluster`` (a :class:`nakshatra.cluster.config.ClusterFile`; the
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
