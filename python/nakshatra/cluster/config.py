"""The cluster file: one TOML file that says which model runs where.

``nak plan`` writes it, ``nak up`` starts the stages of this host from it (and prints the command
for every other host), ``nak status FILE`` and ``nak down FILE`` read it. Example::

    # written by `nak plan` (or by hand)
    model = "smollm2"                 # a built-in name, or a GGUF path relative to this file
    key_file = "cluster.key"          # optional: the cluster key (`nak keygen`), relative to this file
    slices_dir = "slices"             # optional: where the slices are (default: beside this file)

    [options]                         # optional; what every stage and client gets
    ctx = 2048                        # KV positions per session
    max_sessions = 8
    mode = "ring"                     # ring | forwarding | relay

    [[hosts]]                         # optional: what each machine offers (input to `nak plan`)
    name = "gaming-pc"
    address = "10.0.0.5"
    memory_mb = 16000                 # memory a stage may use, MiB
    layers_per_s = 950.0              # measured decode speed: layers x tokens per second
    link_ms = 0.5                     # one-way latency from this host to the LAN, ms

    [[stages]]                        # the chain, in layer order
    host = "10.0.0.5"                 # an address the client and the previous stage can reach
    port = 7071
    layers = "0-9"                    # inclusive layer range
    slice = "smollm2.0-9.gguf"        # relative to slices_dir; `nak slice` / `nak up` makes it
    replicas = ["10.0.0.7:7071"]      # optional: more stages serving the same layers

    [[models]]                        # optional: more models the same stages can swap to
    name = "gemma3"                   # what /v1/models lists and a request names
    model = "gemma3-270m"             # a built-in name, or a GGUF path relative to this file
    layers = ["0-5", "6-11", "12-17"] # one inclusive range per [[stages]] entry, in order
    slices = ["gemma3.0-5.gguf", "gemma3.6-11.gguf", "gemma3.12-17.gguf"]  # optional

Layer ranges here are **inclusive** (``"0-9"`` is layers 0..9), as on the command line. The
top-level ``model`` with the ``[[stages]]`` ranges is the model the stages start with; its name is
``name`` if given, else the model's (a built-in name, or a file's stem).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NakError
from ..ranges import LayerRange, parse_range

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MODES = ("ring", "forwarding", "relay")


@dataclass
class HostSpec:
    """A machine offered to the chain: ``memory_mb`` (MiB a stage may use), ``layers_per_s``
    (decode speed, layers x tokens per second, from a short self-benchmark), ``link_ms`` (one-way
    latency to the LAN, ms; a hop between hosts a and b costs ``link_ms[a] + link_ms[b]``)."""

    name: str
    address: str = "127.0.0.1"
    memory_mb: float = 0.0
    layers_per_s: float = 0.0
    link_ms: float = 0.0


@dataclass
class StageSpec:
    """One stage of the chain: where it listens, its inclusive layer range, its slice file
    (relative to the cluster's slices_dir) and the addresses of its replicas (``host:port``)."""

    host: str
    port: int
    layers: LayerRange
    slice: str = ""
    replicas: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class ModelSpec:
    """A model the cluster's stages can serve: ``name`` (what ``/v1/models`` lists), ``model``
    (a built-in name or a GGUF path, relative to the cluster file), ``layers``: one inclusive layer
    range per stage, in stage order, and ``slices``: the slice file per stage (relative to
    slices_dir; empty: named by ``nak up`` when it cuts them)."""

    name: str
    model: str
    layers: list[LayerRange]
    slices: list[str] = field(default_factory=list)


def model_name(model: str) -> str:
    """The name a model goes by when the file gives none: a built-in or hub name as written, a
    GGUF file's stem (``models/coder.gguf`` -> ``coder``)."""
    return Path(model).stem if model.endswith(".gguf") else model


@dataclass
class ClusterFile:
    """A parsed cluster file. ``path`` is where it was read from (paths in it are relative to
    its folder); ``options`` holds ``ctx``, ``max_sessions``, ``mode`` and any other stage option."""

    model: str
    stages: list[StageSpec]
    hosts: list[HostSpec] = field(default_factory=list)
    key_file: str = ""
    slices_dir: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    name: str = ""  # the started model's name (default: model_name(model))
    models: list[ModelSpec] = field(default_factory=list)  # the others the stages can swap to

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def resolve(self, rel: str) -> Path:
        """A path from the file, relative to the file's folder."""
        p = Path(rel).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    @property
    def slices_path(self) -> Path:
        return self.resolve(self.slices_dir) if self.slices_dir else self.base_dir

    @property
    def model_id(self) -> str:
        """The name of the model the stages start with."""
        return self.name or model_name(self.model)

    def all_models(self) -> list[ModelSpec]:
        """Every model of the file, the started one first (its ranges and slices from ``[[stages]]``)."""
        first = ModelSpec(self.model_id, self.model, [s.layers for s in self.stages], [s.slice for s in self.stages])
        return [first, *self.models]

    def with_model(self, name: str) -> ClusterFile:
        """This cluster serving model ``name``: the same stages (hosts, ports, replicas) with that
        model's layer ranges and slices. Raises NakError naming the models there are."""
        spec = next((m for m in self.all_models() if m.name == name), None)
        if spec is None:
            names = ", ".join(m.name for m in self.all_models())
            raise _fail(self.path, f"no model named {name!r}; the file has {names}")
        stages = [StageSpec(s.host, s.port, rng, spec.slices[i] if i < len(spec.slices) else "", list(s.replicas))
                  for i, (s, rng) in enumerate(zip(self.stages, spec.layers))]
        rest = [m for m in self.all_models() if m.name != name]
        return ClusterFile(model=spec.model, stages=stages, hosts=self.hosts, key_file=self.key_file,
                           slices_dir=self.slices_dir, options=self.options, path=self.path, name=spec.name,
                           models=rest)

    def addresses(self) -> list[str]:
        """Every stage address, replicas included, in layer order (what ``--chain`` takes)."""
        out = []
        for s in self.stages:
            out.append(s.address)
            out.extend(s.replicas)
        return out


def _fail(path: Path | None, msg: str) -> NakError:
    return NakError(f"{path or 'cluster file'}: {msg}")


def parse_cluster(data: dict[str, Any], path: Path | None = None) -> ClusterFile:
    """A ClusterFile from TOML data; raises NakError naming the file, the entry and the fix."""
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise _fail(path, 'needs `model = "NAME or PATH"` (a built-in name such as smollm2, or a GGUF file)')
    stages = []
    for i, s in enumerate(data.get("stages", [])):
        where = f"[[stages]] #{i + 1}"
        if not isinstance(s, dict) or "host" not in s or "port" not in s or "layers" not in s:
            raise _fail(path, f"{where} needs host, port and layers (e.g. layers = \"0-9\")")
        try:
            rng = parse_range(str(s["layers"]))
        except NakError as e:
            raise _fail(path, f"{where}: {e}") from None
        port = s["port"]
        if not isinstance(port, int) or not 0 < port < 65536:
            raise _fail(path, f"{where}: port {port!r} must be an integer in 1..65535")
        reps = s.get("replicas", [])
        if not isinstance(reps, list) or not all(isinstance(r, str) and ":" in r for r in reps):
            raise _fail(path, f'{where}: replicas must be a list of "host:port" strings')
        stages.append(StageSpec(host=str(s["host"]), port=port, layers=rng, slice=str(s.get("slice", "")),
                                replicas=list(reps)))
    hosts = []
    for i, h in enumerate(data.get("hosts", [])):
        if not isinstance(h, dict) or "name" not in h:
            raise _fail(path, f"[[hosts]] #{i + 1} needs a name")
        try:
            hosts.append(HostSpec(name=str(h["name"]), address=str(h.get("address", "127.0.0.1")),
                                  memory_mb=float(h.get("memory_mb", 0)), layers_per_s=float(h.get("layers_per_s", 0)),
                                  link_ms=float(h.get("link_ms", 0))))
        except (TypeError, ValueError) as e:
            raise _fail(path, f"[[hosts]] #{i + 1}: {e}") from None
    options = dict(data.get("options", {}))
    if options.get("mode", "ring") not in MODES:
        raise _fail(path, f"options.mode {options['mode']!r} must be one of {', '.join(MODES)}")
    name = data.get("name", "")
    if not isinstance(name, str):
        raise _fail(path, f"name {name!r} must be a string")
    cf = ClusterFile(model=data["model"], stages=stages, hosts=hosts, key_file=str(data.get("key_file", "")),
                     slices_dir=str(data.get("slices_dir", "")), options=options, path=path, name=name)
    check_chain(cf)
    cf.models = [_parse_model(path, i, m, len(stages)) for i, m in enumerate(data.get("models", []))]
    seen: set[str] = set()
    for m in cf.all_models():
        if m.name in seen:
            raise _fail(path, f"two models are named {m.name!r}; give each [[models]] entry its own name")
        seen.add(m.name)
        check_chain(cf.with_model(m.name))
    return cf


def _parse_model(path: Path | None, i: int, m: Any, n_stages: int) -> ModelSpec:
    where = f"[[models]] #{i + 1}"
    if not isinstance(m, dict) or not isinstance(m.get("model"), str) or not m["model"]:
        raise _fail(path, f'{where} needs model = "NAME or PATH"')
    layers = m.get("layers")
    if not isinstance(layers, list) or len(layers) != n_stages:
        raise _fail(path, f"{where} ({m['model']}): layers must list one inclusive range per [[stages]] entry "
                          f"({n_stages}), e.g. layers = [\"0-9\", \"10-29\"]")
    try:
        rngs = [parse_range(str(r)) for r in layers]
    except NakError as e:
        raise _fail(path, f"{where}: {e}") from None
    slices = m.get("slices", [])
    if (not isinstance(slices, list) or (slices and len(slices) != n_stages)
            or not all(isinstance(x, str) for x in slices)):
        raise _fail(path, f"{where}: slices must list one file per [[stages]] entry ({n_stages}), or be left out")
    name = m.get("name") or model_name(m["model"])
    return ModelSpec(str(name), m["model"], rngs, list(slices))


def check_chain(cf: ClusterFile) -> None:
    """The stages must cover layers 0..n-1 once each, in order, with no gap or overlap."""
    nxt = 0
    for s in cf.stages:
        if nxt == 0 and s.layers.start != 0:
            raise _fail(cf.path, f"the first stage ({s.address}) starts at layer {s.layers.start}: the stages must "
                                 "start at layer 0 and be listed in layer order")
        if s.layers.start != nxt:
            what = "a gap" if s.layers.start > nxt else "an overlap"
            raise _fail(cf.path, f"stage {s.address} starts at layer {s.layers.start} but the previous one ends at "
                                 f"{nxt - 1}: {what}; stages must be listed in layer order and cover every layer once")
        nxt = s.layers.end


def load_cluster(path: Path | str) -> ClusterFile:
    """Read and check a cluster file; raises NakError (missing file, bad TOML, bad entry)."""
    path = Path(path)
    if not path.is_file():
        raise NakError(f"{path}: no such cluster file; `nak plan` writes one (see `nak plan --help`)")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"not valid TOML: {e}") from None
    return parse_cluster(data, path)


def cluster_to_dict(cf: ClusterFile) -> dict[str, Any]:
    """The TOML-ready dict of a ClusterFile (inverse of parse_cluster)."""
    d: dict[str, Any] = {"model": cf.model}
    if cf.name:
        d["name"] = cf.name
    if cf.key_file:
        d["key_file"] = cf.key_file
    if cf.slices_dir:
        d["slices_dir"] = cf.slices_dir
    if cf.options:
        d["options"] = dict(cf.options)
    if cf.hosts:
        d["hosts"] = [{"name": h.name, "address": h.address, "memory_mb": h.memory_mb,
                       "layers_per_s": h.layers_per_s, "link_ms": h.link_ms} for h in cf.hosts]
    d["stages"] = []
    for s in cf.stages:
        e: dict[str, Any] = {"host": s.host, "port": s.port, "layers": s.layers.inclusive()}
        if s.slice:
            e["slice"] = s.slice
        if s.replicas:
            e["replicas"] = list(s.replicas)
        d["stages"].append(e)
    if cf.models:
        d["models"] = []
        for m in cf.models:
            e = {"name": m.name, "model": m.model, "layers": [r.inclusive() for r in m.layers]}
            if any(m.slices):
                e["slices"] = list(m.slices)
            d["models"].append(e)
    return d


def dump_cluster(cf: ClusterFile, header: str = "") -> str:
    """TOML text of a ClusterFile, with ``header`` as leading comment lines."""
    import tomli_w

    lines = "".join(f"# {ln}\n" for ln in header.splitlines())
    return lines + tomli_w.dumps(cluster_to_dict(cf))
