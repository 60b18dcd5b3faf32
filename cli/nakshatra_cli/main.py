"""``nak``: the Nakshatra command line (Typer + Rich).

Errors are one red line on stderr naming the fix, exit code 1; ``--debug`` shows the traceback.
``nak run`` writes only the generated text to stdout; everything else goes to stderr.

The app and what the commands share are in :mod:`nakshatra_cli.app`; each ``cmd_*`` module
defines its commands on it at module level. Importing them here adds them, in the order
``nak --help`` lists them.
"""

from __future__ import annotations

import sys

from rich.text import Text

from nakshatra.errors import NakError

# importing a command module adds its commands to the app: `nak --help` lists them in this order
from . import cmd_api  # api, chat
from . import cmd_bench  # bench
from . import cmd_cluster  # up, down
from . import cmd_discover  # discover
from . import cmd_model  # slice, inspect, pull
from . import cmd_ops  # build, status, soak, doctor
from . import cmd_plan  # plan
from . import cmd_run  # run
from . import cmd_serve  # keygen, serve
from .app import _state, app, err_console
from .cmd_bench import _peak_rss_cell  # imported from here by the tests

__all__ = ["app", "main", "_peak_rss_cell"]
COMMAND_MODULES = (cmd_run, cmd_model, cmd_serve, cmd_bench, cmd_ops, cmd_api, cmd_cluster, cmd_discover, cmd_plan)


def main() -> None:
    """Entry point: run the app, turning NakError into one red line and exit code 1."""
    try:
        app(prog_name="nak")
    except NakError as e:
        if _state["debug"]:
            err_console.print_exception()
        err_console.print(Text.assemble(("error: ", "bold red"), str(e)), highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
