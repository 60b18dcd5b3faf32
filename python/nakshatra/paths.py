"""Where Nakshatra keeps its caches (models, slices, the compiled llama.cpp tree)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$NAKSHATRA_CACHE_DIR``, else ``$XDG_CACHE_HOME/nakshatra``, else
    ``~/.cache/nakshatra``. Created on first use. The CMake build uses the same rule
    (cpp/cmake/llama.cmake)."""
    env = os.environ.get("NAKSHATRA_CACHE_DIR")
    if env:
        root = Path(env)
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "nakshatra"
    else:
        root = Path.home() / ".cache" / "nakshatra"
    root.mkdir(parents=True, exist_ok=True)
    return root
