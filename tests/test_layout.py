"""The package layout (issue 15): packages shaped like the system, only shared modules at the top,
and the flat names from before 0.2 still working for one release (nakshatra/_moved.py).

No model and no stage: it imports modules and runs two ``--help`` command lines.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import nakshatra
from nakshatra import _moved

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "python" / "nakshatra"
TOP = {"__init__", "_moved", "errors", "paths", "ranges", "auth", "build", "procfs", "subprocesses"}
PACKAGES = {"gguf", "client", "server", "cluster", "bench"}


def test_only_shared_modules_at_the_top():
    top = {p.stem for p in PKG.glob("*.py")}
    assert top == TOP, f"modules at the top of nakshatra/ must be used everywhere; move {top - TOP} into a package"
    pkgs = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert pkgs == PACKAGES


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_an_old_name_is_the_new_module_with_a_warning(old: str):
    new = importlib.import_module("nakshatra." + _moved.MOVED[old])
    sys.modules.pop(f"nakshatra.{old}", None)
    if old in vars(nakshatra):
        delattr(nakshatra, old)
    with pytest.warns(DeprecationWarning, match=f"nakshatra.{old} moved to nakshatra.{_moved.MOVED[old]}"):
        got = importlib.import_module(f"nakshatra.{old}")
    assert got is new
    assert got.__spec__.name == got.__name__ == new.__name__  # its own spec: relative imports do not warn


def test_bench_and_cluster_forward_the_old_modules_names():
    import nakshatra.bench
    import nakshatra.cluster
    from nakshatra.bench import links, side_by_side
    from nakshatra.cluster import config

    with pytest.warns(DeprecationWarning, match="nakshatra.bench.side_by_side.run_bench"):
        assert nakshatra.bench.run_bench is side_by_side.run_bench
    with pytest.warns(DeprecationWarning, match="nakshatra.bench.links.bench_links"):
        assert nakshatra.bench.bench_links is links.bench_links
    with pytest.warns(DeprecationWarning, match="nakshatra.cluster.config.load_cluster"):
        assert nakshatra.cluster.load_cluster is config.load_cluster
    with pytest.raises(AttributeError, match="no_such_name"):
        nakshatra.bench.no_such_name  # noqa: B018
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a submodule is not an old name: no warning
        from nakshatra.bench import soak
    assert soak.__name__ == "nakshatra.bench.soak"


@pytest.mark.parametrize("old, new, args", [
    ("nakshatra.linkdelay", "nakshatra.bench.linkdelay", ["--help"]),
    ("nakshatra.up", "nakshatra.cluster.fileserver", ["files", "--help"]),
])
def test_python_m_with_an_old_name_runs_the_new_module(old: str, new: str, args: list[str]):
    r = subprocess.run([sys.executable, "-m", old, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"usage: python -m {new}" in r.stdout
