"""`nak` commands of this module are added to the app by register() (cli/nakshatra_cli/main.py)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
