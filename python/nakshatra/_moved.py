"""The flat module names from before 0.2, kept importable for one release.

Until 0.2 every module sat directly in ``nakshatra/``; now they live in packages shaped like the
system (``gguf/``, ``client/``, ``server/``, ``cluster/``, ``bench/``). An import of an old name
(``import nakshatra.slicer``, ``from nakshatra.chain import Chain``) gets the very same module
object as the new name, with a DeprecationWarning that names the new one, and
``python -m nakshatra.linkdelay`` (or ``.serve``, ``.up``, ``.footprint``) still runs the module's
command line. Two old modules, ``nakshatra.bench`` and ``nakshatra.cluster``, share their name with
the package that replaced them; those packages forward the old module's names (:func:`forward`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType
from typing import Any

# old name (under nakshatra.) -> new name (under nakshatra.)
MOVED = {
    "gguf_scan": "gguf.scan", "slicer": "gguf.slicer", "manifest": "gguf.manifest", "shards": "gguf.shards",
    "inspection": "gguf.inspection", "memory": "gguf.memory", "synthetic": "gguf.synthetic",
    "models": "gguf.models", "hub": "gguf.hub", "remote": "gguf.remote",
    "chain": "client.chain", "api": "client.api",
    "serve": "server.serve", "local": "server.local",
    "plan": "cluster.plan", "up": "cluster.up", "discovery": "cluster.discovery",
    "rpc_baseline": "bench.rpc_baseline", "linkdelay": "bench.linkdelay", "soak": "bench.soak",
    "swabench": "bench.swa", "hostbench": "bench.hosts", "hostemu": "bench.hostemu",
    "footprint": "bench.footprint", "workloads": "bench.workloads", "upstream": "bench.upstream",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old name goes away in 0.3", DeprecationWarning, stacklevel=3)


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Finds ``nakshatra.<old>`` and loads it as the module ``nakshatra.<new>`` already is."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, leaf = fullname.partition(".")
        if prefix != "nakshatra" or leaf not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = "nakshatra." + MOVED[spec.name.partition(".")[2]]
        _warn(spec.name, new)
        module = importlib.import_module(new)
        self._spec = module.__spec__  # the import system overwrites it with the old name's next
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the new module ran already; give it back its own spec, else __spec__.parent (the old
        # name's package) and __package__ disagree and its relative imports warn
        module.__spec__ = self._spec

    def get_source(self, fullname: str) -> str:
        # what `python -m nakshatra.<old>` runs: the new module as __main__
        new = "nakshatra." + MOVED[fullname.partition(".")[2]]
        return f"import runpy\nrunpy.run_module({new!r}, run_name='__main__', alter_sys=True)\n"

    def get_code(self, fullname: str) -> CodeType:
        return compile(self.get_source(fullname), f"<{fullname}>", "exec")


def install() -> None:
    """Put the old-name finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _OldNames) for f in sys.meta_path):
        sys.meta_path.append(_OldNames())


def forward(package: str, name: str, modules: tuple[str, ...]) -> Any:
    """``getattr`` for a package that replaced a module of its name: ``name`` from the first of
    ``modules`` (submodules of ``package``) that has it, with a DeprecationWarning.

    Raises AttributeError when none has it (so ``from package import submodule`` still imports
    the submodule)."""
    if not name.startswith("__"):
        for m in modules:
            mod = importlib.import_module(f"{package}.{m}")
            if name in vars(mod):
                _warn(f"{package}.{name}", f"{package}.{m}.{name}")
                return vars(mod)[name]
    raise AttributeError(f"module {package!r} has no attribute {name!r}")
