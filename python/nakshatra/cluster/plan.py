"""``nak plan``: choose which hosts serve which layers, exactly, under a stated cost model.

Inputs: a GGUF model, and hosts (:class:`~nakshatra.cluster.config.HostSpec`), each with

* ``memory_mb``: MiB a stage on it may use;
* ``layers_per_s``: its decode speed for this model, layers x tokens per second
  (:func:`probe_host` measures it: ``nak plan MODEL --probe``);
* ``link_ms``: its one-way latency to the network, ms.

**Memory model** (bytes, :func:`model_memory`). A stage serving layers ``a..b`` needs its
footprint as :mod:`nakshatra.gguf.memory` predicts it (the smallest memory limit under which it runs a
full context at speed):

    sum over its layers of (tensor bytes + KV bytes)
    + the input tensors                                if it is the first stage (a = 0); of the
      token embedding only the pages of the rows a context can touch (a lookup reads one row
      per token)
    + output norm and LM head                          if it is the last stage (b = n_layer - 1);
      a tied model has no LM head tensor, so the last stage also holds the token embedding
    + global tensors (e.g. ``rope_freqs``, on every stage)
    + the stage's fixed cost, by kind (first, middle, last, or the only stage): llama.cpp's
      compute and output buffers and its heap (vocabulary, graph tables), the stage's copies of
      a batch of hidden states, and the process baseline. llama.cpp's figures come from
      ``no_alloc`` estimates (:func:`nakshatra.gguf.memory.predict_stage`) of a two-layer slice of
      each kind (cut once into the slice cache) and of the whole model: they depend on the kind,
      hardly on the number of layers (within 1 MiB from 2 layers up).

KV bytes of a layer = ``max_sessions`` x cells x ``(head_dim_k + head_dim_v) x n_head_kv`` x 2 (f16
cache), as ``nak inspect`` counts them and llama.cpp allocates them
(:func:`nakshatra.gguf.inspection.kv_cells`: ``ctx`` cells, or for a sliding-window layer the window
plus one ubatch). Tensor bytes are the exact sizes in the GGUF, which are what ``nak slice`` writes.

**Latency model** (ms per generated token, one session, :func:`chain_latency_ms`). For a chain of
hosts ``h1 .. hk`` in layer order, where ``hi`` serves ``ni`` layers::

    latency = sum_i 1000 x ni / layers_per_s(hi)                       compute
            + sum_{i<k} (link_ms(hi) + link_ms(hi+1))                  each hop between stages
            + (ring mode, k > 1) link_ms(hk) + link_ms(h1)             the token back to the first

Stages work one after the other on a token, so their times add up. The speed is measured on
whole-model decode steps, so the time of the embedding lookup and LM head is spread over the
layers. In forwarding mode the client's own hops (to the first stage and back from the last) are
not counted: they depend on where the client runs, not on the plan. Concurrent sessions, prefill
and bandwidth (a hidden state is ``n_embd`` x 4 bytes) are not modelled.

**Optimisation** (:func:`plan_chain`). Over every ordered subset of the hosts and every split of
the layers into contiguous non-empty ranges, the planner finds the one with the smallest latency
whose every stage fits its host's memory: hosts given no layers are left out, so a host whose
links cost more than the compute it would take over is not used. It is exact: a dynamic program
over (set of hosts used, last host, layers covered) with O(2^H x H^2 x L^2) work for H hosts and
L layers (0.05 s for 8 hosts and 80 layers, 2 s for 12 hosts and 128), checked against
brute-force enumeration in tests/test_plan.py. Among equal latencies it takes the fewest stages.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
from rich.table import Table

from .. import procfs
from ..errors import NakError
from ..ranges import LayerRange
from .config import ClusterFile, HostSpec, StageSpec

MIB = 1 << 20

MAX_HOSTS = 12
"""Most hosts one plan considers (the exact search is exponential in the number of hosts)."""

PLAN_MODES = ("ring", "forwarding")
DEFAULT_LINK_MS = 0.5
"""What :func:`probe_host` proposes for ``link_ms``: a wired LAN; the user should measure it."""


# ---- memory ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryModel:
    """Bytes a stage needs, per the module docstring. ``weights[i]`` / ``kv[i]``: tensor and KV
    bytes of layer ``i``; ``first_extra``: input tensors the first stage keeps resident;
    ``last_extra``: output tensors, plus the token embedding when tied (last stage);
    ``stage_extra``: global tensors (every stage); ``fixed``: the fixed cost of a stage by kind,
    ``(first, middle, last, only)`` (``only``: one stage serving every layer); a single int is
    the same for every kind. ``sliding``: per-layer sliding-window flags of a model whose llama.cpp
    graph needs a sliding-window layer in every stage (gemma2, gpt-oss, ...: the slicer refuses
    other cuts); empty when any cut will do."""

    weights: tuple[int, ...]
    kv: tuple[int, ...]
    first_extra: int = 0
    last_extra: int = 0
    stage_extra: int = 0
    fixed: tuple[int, int, int, int] | int = 0
    sliding: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.fixed, int):
            object.__setattr__(self, "fixed", (self.fixed,) * 4)
        if not self.weights or len(self.weights) != len(self.kv):
            raise NakError("a memory model needs one weights and one KV byte count per layer")
        if len(self.fixed) != 4:
            raise NakError("a memory model's fixed costs are (first, middle, last, only)")
        if self.sliding and len(self.sliding) != len(self.weights):
            raise NakError("a memory model's sliding-window flags need one entry per layer")
        if min(self.weights) < 0 or min(self.kv) < 0 or min(self.first_extra, self.last_extra,
                                                             self.stage_extra, *self.fixed) < 0:
            raise NakError("byte counts of a memory model must be >= 0")

    @property
    def n_layer(self) -> int:
        return len(self.weights)

    @property
    def layer_bytes(self) -> list[int]:
        """Tensor plus KV bytes of each layer."""
        return [w + k for w, k in zip(self.weights, self.kv)]

    def stage_weights(self, rng: LayerRange) -> int:
        """Resident tensor bytes of a stage serving ``rng``, without global tensors."""
        return (sum(self.weights[rng.start:rng.end]) + (self.first_extra if rng.start == 0 else 0)
                + (self.last_extra if rng.end == self.n_layer else 0))

    def stage_kv(self, rng: LayerRange) -> int:
        """KV bytes of a stage serving ``rng``."""
        return sum(self.kv[rng.start:rng.end])

    def stage_fixed(self, rng: LayerRange) -> int:
        """The fixed cost of a stage serving ``rng``: global tensors plus the fixed cost of its kind."""
        first, last = rng.start == 0, rng.end == self.n_layer
        kind = 3 if first and last else 0 if first else 2 if last else 1
        return self.stage_extra + self.fixed[kind]

    def stage_bytes(self, rng: LayerRange) -> int:
        """Everything a stage serving ``rng`` needs: weights + KV + global tensors + fixed cost."""
        return self.stage_weights(rng) + self.stage_kv(rng) + self.stage_fixed(rng)

    def chain_fixed(self, m: int) -> int:
        """Fixed costs of a chain of ``m`` stages, global tensors included."""
        first, middle, last, only = self.fixed
        return m * self.stage_extra + (only if m == 1 else first + last + (m - 2) * middle)


def _kind_ranges(n_layer: int) -> dict[int, LayerRange]:
    """A short range of each stage kind (0 first, 1 middle, 2 last) a model of ``n_layer`` layers
    can have: two layers where it has five or more. llama.cpp reserves a smaller compute buffer
    for a one-layer slice than for any longer one (SmolLM2's last stage: 6.1 MiB against 14.0
    MiB for 2 to 30 layers), since with two layers the tensors of one layer cannot reuse the
    memory of the next."""
    w = 2 if n_layer >= 5 else 1
    out = {}
    if n_layer >= 2:
        out[0], out[2] = LayerRange(0, w), LayerRange(n_layer - w, n_layer)
    if n_layer >= 2 * w + 1:
        out[1] = LayerRange(w, 2 * w)
    return out


def model_memory(path: str | os.PathLike[str], ctx: int = 4096, max_sessions: int = 8) -> MemoryModel:
    """The :class:`MemoryModel` of a whole GGUF model whose stages keep ``ctx x max_sessions`` KV
    positions (as ``nak serve --ctx CTX --max-sessions N``). The fixed cost of each stage kind is
    predicted (:func:`nakshatra.gguf.memory.predict_stage`) from a two-layer slice of that kind, cut
    once into the slice cache, and the whole model.

    Raises NakError if ``ctx`` or ``max_sessions`` is < 1 or llama.cpp cannot load the model,
    SliceError if the file is missing, not a GGUF, already a slice, or of an architecture
    ``nak slice`` cannot cut.
    """
    from ..gguf.inspection import inspect_gguf
    from ..gguf.memory import predict_stage
    from ..gguf.slicer import cached_slice, model_layout

    if ctx < 1 or max_sessions < 1:
        raise NakError(f"--ctx {ctx} and --max-sessions {max_sessions} must both be >= 1")
    layout = model_layout(path, sha256="-")  # checks it can be sliced; no need to hash it
    info = inspect_gguf(path, n_ctx=ctx, max_sessions=max_sessions)
    kv = tuple(info["kv_layer_bytes"])
    preds = {kind: predict_stage(cached_slice(path, rng, layout.n_layer, progress=False), ctx=ctx,
                                 max_sessions=max_sessions)
             for kind, rng in _kind_ranges(layout.n_layer).items()}
    preds[3] = predict_stage(path, ctx=ctx, max_sessions=max_sessions)
    # of the input embedding only the rows a context can touch stay resident (memory.predict_stage;
    # a first stage that is also the last of a tied model reads it all as its LM head)
    first_extra = layout.first_extra
    if preds.get(0, preds[3])["embd_rows_bytes"]:
        first_extra += preds.get(0, preds[3])["embd_rows_bytes"] - layout.token_embd_bytes
    bare = MemoryModel(weights=tuple(layout.layer_bytes), kv=kv, first_extra=first_extra,
                       last_extra=layout.last_extra, stage_extra=layout.global_bytes, fixed=0)
    # each kind's fixed cost: what the prediction for its short slice (or the whole model) holds
    # beyond the tensors and KV the memory model counts per layer, so that the model gives
    # exactly the prediction for those ranges
    ranges = {**_kind_ranges(layout.n_layer), 3: LayerRange(0, layout.n_layer)}
    fixed = {k: max(0, p["total_bytes"] - bare.stage_bytes(ranges[k])) for k, p in preds.items()}
    return replace(bare, fixed=tuple(fixed.get(k, fixed[3]) for k in range(4)), sliding=_required_sliding(path, layout))


def _required_sliding(path: str | os.PathLike[str], layout) -> tuple[bool, ...]:
    """The per-layer sliding-window flags when every stage of this model needs a sliding-window
    layer (``swa_required`` in the architecture table), else ``()``."""
    from ..gguf.archs import arch_table
    from ..gguf.shards import open_model
    from ..gguf.slicer import swa_pattern

    if not arch_table().get(layout.arch, {}).get("swa_required"):
        return ()
    flags = swa_pattern(open_model(path).scan, layout.arch, layout.n_layer)
    return tuple(flags) if flags else ()


# ---- latency --------------------------------------------------------------------------------

def _check_hosts(hosts: Sequence[HostSpec]) -> None:
    if not hosts:
        raise NakError("no hosts to plan for: give --host NAME=ADDRESS,mem=MiB,speed=LAYERS_PER_S "
                       "(see `nak plan --help`) or a --cluster file with [[hosts]]")
    if len(hosts) > MAX_HOSTS:
        raise NakError(f"{len(hosts)} hosts given; the planner is exact and handles at most {MAX_HOSTS}: "
                       "leave out the slowest or smallest hosts")
    seen = set()
    for h in hosts:
        if not h.name:
            raise NakError("every host needs a name")
        if h.name in seen:
            raise NakError(f"host name {h.name!r} is given twice: give each host its own name")
        seen.add(h.name)
        for what, v, fix in (("memory_mb", h.memory_mb, "mem=MiB it may use"),
                             ("layers_per_s", h.layers_per_s, "speed=LAYERS_PER_S from `nak plan MODEL --probe` on it")):
            if not (math.isfinite(v) and v > 0):
                raise NakError(f"host {h.name!r} has {what} = {v}: it must be > 0; give {fix}")
        if not (math.isfinite(h.link_ms) and h.link_ms >= 0):
            raise NakError(f"host {h.name!r} has link_ms = {h.link_ms}: it must be >= 0 (one-way latency, ms)")


def _check_mode(mode: str) -> None:
    if mode not in PLAN_MODES:
        raise NakError(f"mode {mode!r}: nak plan models {' or '.join(PLAN_MODES)} (relay sends every hidden "
                       "state through the client, whose place in the network is not known)")


def chain_latency_ms(chain: Sequence[tuple[HostSpec, int]], mode: str = "ring") -> tuple[float, float]:
    """(compute ms, link ms) per token of a chain of (host, number of layers) in layer order,
    per the module docstring."""
    compute = sum(1000.0 * n / h.layers_per_s for h, n in chain)
    links = sum(a.link_ms + b.link_ms for (a, _), (b, _) in pairwise(chain))
    if mode == "ring" and len(chain) > 1:
        links += chain[-1][0].link_ms + chain[0][0].link_ms
    return compute, links


# ---- the plan -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedStage:
    """One stage of a plan: its host, layers, bytes it needs (:meth:`MemoryModel.stage_bytes`),
    compute ms per token and the ms of the hop after it (to the next stage; for the last stage in
    ring mode back to the first, else 0)."""

    host: HostSpec
    layers: LayerRange
    memory_bytes: int
    compute_ms: float
    hop_ms: float


@dataclass(frozen=True)
class LeftOut:
    """A host the plan does not use, and why (``best_with_ms``: the best latency of a chain that
    uses it, None if no feasible chain can)."""

    host: HostSpec
    reason: str
    best_with_ms: float | None


@dataclass(frozen=True)
class Plan:
    """The optimal chain: ``stages`` in layer order, ``left_out`` hosts, the mode, and the
    latency split into compute and links (ms per token)."""

    stages: list[PlannedStage]
    left_out: list[LeftOut]
    mode: str
    memory: MemoryModel
    compute_ms: float = field(init=False)
    link_ms: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute_ms", sum(s.compute_ms for s in self.stages))
        object.__setattr__(self, "link_ms", sum(s.hop_ms for s in self.stages))

    @property
    def total_ms(self) -> float:
        return self.compute_ms + self.link_ms

    @property
    def ranges(self) -> list[LayerRange]:
        return [s.layers for s in self.stages]

    def ranges_text(self) -> str:
        """``--ranges`` for ``nak slice``: ``"0-9,10-29"``."""
        return ",".join(r.inclusive() for r in self.ranges)


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f} MiB"


def _infeasible(mem: MemoryModel, hosts: Sequence[HostSpec]) -> NakError:
    """The error for hosts that cannot hold the model, naming how much memory is missing."""
    caps = sorted((h.memory_mb * MIB for h in hosts), reverse=True)
    base = sum(mem.layer_bytes) + mem.first_extra + mem.last_extra
    kv = sum(mem.kv)
    # a chain of m stages needs base + its fixed costs, on m hosts offering at most the m largest
    short = min(base + mem.chain_fixed(m) - sum(caps[:m]) for m in range(1, min(len(hosts), mem.n_layer) + 1))
    fix = (f"add a host or memory, or lower --ctx / --max-sessions (the KV cache is {_mib(kv)} of it)"
           if kv else "add a host or memory")
    if short > 0:
        m_all = min(len(hosts), mem.n_layer)
        split = (f", {_mib(base + mem.chain_fixed(m_all))} split over {m_all} stages (each adds "
                 f"{_mib(mem.chain_fixed(m_all) / m_all)} of fixed cost on average)" if m_all > 1 else "")
        return NakError(f"the hosts cannot hold the model: it needs {_mib(base + mem.chain_fixed(1))} on one host{split}, "
                        f"but they offer {_mib(sum(caps))} in all: at least {_mib(short)} missing; {fix}")
    n = mem.n_layer
    first = mem.stage_bytes(LayerRange(0, 1))
    last = mem.stage_bytes(LayerRange(n - 1, n))
    big = max(mem.stage_bytes(LayerRange(i, i + 1)) for i in range(n))
    why = (f"the first stage needs at least {_mib(first)} (token embedding and one layer), the last at least "
           f"{_mib(last)}, the largest one-layer stage {_mib(big)}, and the largest host offers {_mib(caps[0])}")
    if max(first, last, big) > caps[0]:
        return NakError(f"the hosts offer enough memory in all ({_mib(sum(caps))}), but no split into contiguous "
                        f"layer ranges fits them: {why}: at least {_mib(max(first, last, big) - caps[0])} missing "
                        f"on one host; {fix}")
    return NakError(f"the hosts offer enough memory in all ({_mib(sum(caps))}), but no split into contiguous layer "
                    f"ranges fits them (the stages do not divide among the hosts; {why}); {fix}")


def _stage_matrices(mem: MemoryModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``need[j, e]``: bytes of a stage serving layers j..e-1 (:meth:`MemoryModel.stage_bytes`);
    ``span[j, e]``: its layer count; ``allowed[j, e]``: whether such a stage may exist (not empty;
    holding a sliding-window layer where the model needs one in every stage)."""
    n = mem.n_layer
    prefix = np.concatenate([[0], np.cumsum(np.asarray(mem.layer_bytes, dtype=np.int64))])
    idx = np.arange(n + 1)
    first_f, middle_f, last_f, only_f = mem.fixed
    need = prefix[None, :] - prefix[:, None] + mem.stage_extra + middle_f
    need[0, :] += mem.first_extra + first_f - middle_f
    need[:, n] += mem.last_extra + last_f - middle_f
    need[0, n] += only_f - first_f - last_f + middle_f
    span = (idx[None, :] - idx[:, None]).astype(np.float64)
    allowed = span > 0
    if mem.sliding:  # a stage must hold a sliding-window layer (MemoryModel.sliding)
        n_sliding = np.concatenate([[0], np.cumsum(np.asarray(mem.sliding, dtype=np.int64))])
        allowed &= (n_sliding[None, :] - n_sliding[:, None]) > 0
    return need, span, allowed


def plan_on_stages(mem: MemoryModel, hosts: Sequence[HostSpec], mode: str = "ring",
                   reserved: Sequence[int] = ()) -> Plan:
    """Layer ranges of another model for a cluster's existing stages: ``hosts[i]`` is the host of
    stage ``i``, in chain order, and every stage gets at least one layer (a cluster file's
    ``[[models]]`` entry has one range per stage). ``reserved[i]``: bytes stage ``i``'s host keeps
    for the model it serves now (a swap loads the new slice beside it), taken from its memory.
    The chain and its hops are fixed, so the least compute time wins (an exact dynamic program
    over the split points).

    Raises NakError for an unknown mode, a host without memory or speed, or stages that cannot
    hold the model (naming the stage that runs short)."""
    _check_mode(mode)
    if not hosts:
        raise NakError("no stages to plan on")
    for h in hosts:
        if h.memory_mb <= 0 or h.layers_per_s <= 0:
            raise NakError(f"host {h.name} ({h.address}) needs mem and speed: nak plan MODEL --probe on it, "
                           "then a [[hosts]] entry or --host")
    n, k = mem.n_layer, len(hosts)
    if k > n:
        raise NakError(f"the model has {n} layers, fewer than the {k} stages: each stage needs at least one")
    need, span, allowed = _stage_matrices(mem)
    res = list(reserved) + [0] * (k - len(reserved))
    # best[i][e]: least compute ms of stages 0..i covering layers 0..e-1
    best = np.full((k, n + 1), np.inf)
    came = np.zeros((k, n + 1), dtype=np.int64)
    for i, h in enumerate(hosts):
        fits = allowed & (need + res[i] <= h.memory_mb * MIB)
        step = np.where(fits, span * (1000.0 / h.layers_per_s), np.inf)
        if i == 0:
            best[0] = step[0]
            continue
        cand = best[i - 1][:, None] + step  # [j, e]
        came[i] = cand.argmin(axis=0)
        best[i] = cand[came[i], np.arange(n + 1)]
    if not np.isfinite(best[k - 1, n]):
        short = min(range(k), key=lambda i: hosts[i].memory_mb * MIB - res[i] - int(need[0, 1]))
        raise NakError(f"the stages cannot hold the model beside the one they serve: no split into {k} contiguous "
                       f"ranges fits (stage {short + 1}, host {hosts[short].name}, has "
                       f"{_mib(hosts[short].memory_mb * MIB - res[short])} left); free memory there, or plan "
                       "the model on other hosts")
    ranges, end = [], n
    for i in range(k - 1, -1, -1):
        start = int(came[i, end]) if i > 0 else 0
        ranges.append(LayerRange(start, end))
        end = start
    ranges.reverse()
    ring = mode == "ring"
    stages = []
    for i, (h, rng) in enumerate(zip(hosts, ranges)):
        nxt = i + 1 if i + 1 < k else (0 if ring and k > 1 else None)
        stages.append(PlannedStage(host=h, layers=rng, memory_bytes=mem.stage_bytes(rng),
                                   compute_ms=1000.0 * rng.n_layers / h.layers_per_s,
                                   hop_ms=0.0 if nxt is None else float(h.link_ms + hosts[nxt].link_ms)))
    return Plan(stages=stages, left_out=[], mode=mode, memory=mem)


def plan_chain(mem: MemoryModel, hosts: Sequence[HostSpec], mode: str = "ring") -> Plan:
    """The chain of smallest per-token latency whose stages fit their hosts' memory (see the
    module docstring for both models and the method). Exact; ties go to fewer stages.

    Raises NakError for no hosts, more than MAX_HOSTS, duplicate names, a host without memory or
    speed, a negative link, an unknown mode, or hosts that cannot hold the model (the message says
    how much memory is missing).
    """
    _check_mode(mode)
    _check_hosts(hosts)
    ring = mode == "ring"
    n, k = mem.n_layer, len(hosts)
    idx = np.arange(n + 1)
    need, span, allowed = _stage_matrices(mem)
    # step[h][j, e]: compute ms of host h serving layers j..e-1, inf where it is not allowed
    # (empty; no sliding layer where one is needed) or does not fit
    step = [np.where(allowed & (need <= h.memory_mb * MIB), span * (1000.0 / h.layers_per_s), np.inf)
            for h in hosts]
    link = np.array([h.link_ms for h in hosts], dtype=np.float64)
    hop = link[:, None] + link[None, :]

    # best[mask, last, e]: least ms of a chain using exactly the hosts in mask, ending with host
    # `last` at layer e-1 (layers 0..e-1 covered); in ring mode it already counts link[first]
    size = 1 << k
    best = np.full((size, k, n + 1), np.inf)
    prev_last = np.full((size, k, n + 1), -1, dtype=np.int8)
    prev_end = np.zeros((size, k, n + 1), dtype=np.int32)
    for h in range(k):
        best[1 << h, h] = step[h][0] + (link[h] if ring else 0.0)
    for mask in range(1, size):
        cur = best[mask]
        if not np.isfinite(cur[:, :n]).any():
            continue
        for h in range(k):
            if mask >> h & 1:
                continue
            via = cur + hop[:, h][:, None]  # [last, j]: arrive at host h having covered 0..j-1
            came_from = via.argmin(axis=0)
            arrive = via[came_from, idx]
            cand = arrive[:, None] + step[h]  # [j, e]
            start = cand.argmin(axis=0)
            nxt = mask | 1 << h
            best[nxt, h] = cand[start, idx]
            prev_end[nxt, h] = start
            prev_last[nxt, h] = came_from[start]

    # total[mask, last]: latency of the complete chain
    total = best[:, :, n].copy()
    counts = np.array([m.bit_count() for m in range(size)])
    for h in range(k):
        if ring:
            total[1 << h, h] = step[h][0, n]  # one stage: no hop at all
            total[counts > 1, h] += link[h]   # the hop from the last stage back to the first
    if not np.isfinite(total).any():
        raise _infeasible(mem, hosts)
    opt = float(total.min())
    tol = 1e-9 * max(1.0, opt)
    mask, last = min(((int(m), int(h)) for m, h in zip(*np.nonzero(total <= opt + tol))),
                     key=lambda mh: (counts[mh[0]], mh[0], mh[1]))

    def walk_back(mask: int, last: int) -> list[tuple[int, LayerRange]]:
        """The chain (host, layers) in layer order whose latency is total[mask, last]."""
        chain, end = [], n
        while True:
            start = int(prev_end[mask, last, end])
            chain.append((last, LayerRange(start, end)))
            if counts[mask] == 1:
                break
            mask, last, end = mask ^ (1 << last), int(prev_last[mask, last, end]), start
        chain.reverse()
        assert chain[0][1].start == 0
        return chain

    def split_ms(chain: list[tuple[int, LayerRange]]) -> tuple[float, float]:
        return chain_latency_ms([(hosts[h], r.n_layers) for h, r in chain], mode)

    chain = walk_back(mask, last)
    stages = []
    for i, (h, rng) in enumerate(chain):
        nxt = chain[i + 1][0] if i + 1 < len(chain) else (chain[0][0] if ring and len(chain) > 1 else None)
        stages.append(PlannedStage(host=hosts[h], layers=rng, memory_bytes=mem.stage_bytes(rng),
                                   compute_ms=1000.0 * rng.n_layers / hosts[h].layers_per_s,
                                   hop_ms=0.0 if nxt is None else float(link[h] + link[nxt])))
    plan_compute, plan_links = split_ms(chain)

    used = {h for h, _ in chain}
    smallest = min(mem.stage_bytes(LayerRange(i, i + 1)) for i in range(n))
    left_out = []
    for h in range(k):
        if h in used:
            continue
        host = hosts[h]
        with_h = np.where((np.arange(size) >> h & 1).astype(bool)[:, None], total, np.inf)
        best_with = float(with_h.min()) if np.isfinite(with_h).any() else None
        if host.memory_mb * MIB < smallest:
            why = (f"too little memory: the smallest stage (one layer) needs {_mib(smallest)}, it offers "
                   f"{_mib(host.memory_mb * MIB)}")
        elif best_with is None:
            why = "no chain that fits in memory can use it"
        else:
            m_h, l_h = (int(x) for x in np.unravel_index(int(with_h.argmin()), with_h.shape))
            alt = walk_back(m_h, l_h)
            compute, links = split_ms(alt)
            if best_with <= opt + tol:
                cause = "no faster than the plan, and equal latencies go to fewer stages"
            elif compute < plan_compute - tol:
                cause = "its hops cost more than the compute it saves"
            elif links <= plan_links + tol:
                cause = "it computes its layers slower than the hosts that hold them in the plan"
            elif compute <= plan_compute + tol:
                cause = "it saves no compute and adds hops"
            else:
                cause = f"it adds compute time (it takes {1000.0 / host.layers_per_s:.2f} ms per layer) and hops"
            route = " → ".join(f"{hosts[i].name} {r.n_layers}" for i, r in alt)
            why = (f"the best chain using it ({route} layers) takes {best_with:.2f} ms per token (compute "
                   f"{compute:.2f} + links {links:.2f}), {best_with - opt:+.2f} ms: {cause}")
        left_out.append(LeftOut(host=host, reason=why, best_with_ms=best_with))
    plan = Plan(stages=stages, left_out=left_out, mode=mode, memory=mem)
    assert abs(plan.total_ms - opt) <= 1e-6 * max(1.0, opt), (plan.total_ms, opt)
    return plan


# ---- output ---------------------------------------------------------------------------------

def stage_downloads(model_path: str | os.PathLike[str], plan: Plan) -> list[int]:
    """Bytes each stage's host downloads to serve its layers when it does not have the model:
    its slice's share of the file, the head and the tensors the slice keeps, as
    ``nak serve URL --layers`` fetches them (:func:`nakshatra.gguf.remote.download_bytes`; a slice
    fetched whole from ``nak up`` is the same size to within its metadata)."""
    from ..gguf.remote import download_bytes

    return [download_bytes(model_path, s.layers) for s in plan.stages]


def render_plan(plan: Plan, downloads: Sequence[int] | None = None) -> Table:
    """The explanation table: per stage its host, layers, memory used / offered, what it downloads
    (``downloads``, bytes per stage, see :func:`stage_downloads`; column left out when None) and
    the expected ms per token (compute, and the hop after it); totals in the caption, left-out
    hosts below."""
    t = Table(title=f"plan ({plan.mode}): {plan.total_ms:.2f} ms per token expected", title_justify="left")
    t.add_column("host")
    t.add_column("layers")
    t.add_column("memory used / available", justify="right")
    if downloads is not None:
        t.add_column("download", justify="right")
    t.add_column("compute ms", justify="right")
    t.add_column("hop ms", justify="right")
    n = len(plan.stages)
    for i, s in enumerate(plan.stages):
        to = ("→ next" if i + 1 < n else "→ first") if s.hop_ms or i + 1 < n else ""
        dl = [] if downloads is None else [f"{downloads[i] / MIB:,.0f} MiB"]
        t.add_row(f"{s.host.name} ({s.host.address})", str(s.layers),
                  f"{s.memory_bytes / MIB:,.0f} / {s.host.memory_mb:,.0f} MiB", *dl,
                  f"{s.compute_ms:.2f}", f"{s.hop_ms:.2f} {to}".strip())
    for lo in plan.left_out:
        dl = [] if downloads is None else ["—"]
        t.add_row(f"{lo.host.name} ({lo.host.address})", "left out", f"— / {lo.host.memory_mb:,.0f} MiB", *dl, "", "")
    t.caption = (f"per token: compute {plan.compute_ms:.2f} ms + links {plan.link_ms:.2f} ms = "
                 f"{plan.total_ms:.2f} ms (about {1000.0 / plan.total_ms:.1f} tokens/s for one session)"
                 if plan.total_ms > 0 else "")
    if downloads is not None:
        t.caption += ("\ndownload: what a host without the model file fetches to serve its layers "
                      "(nak serve URL --layers, or its slice from nak up)")
    t.caption_justify = "left"
    return t


def left_out_lines(plan: Plan) -> list[str]:
    """One line per left-out host saying why."""
    return [f"left out {lo.host.name} ({lo.host.address}): {lo.reason}" for lo in plan.left_out]


def slice_command(model_path: Path | str, plan: Plan, out_dir: Path | str) -> str:
    """The ``nak slice`` command that makes the plan's slices in ``out_dir``."""
    return (f"nak slice {shlex.quote(str(model_path))} --ranges {plan.ranges_text()} "
            f"-o {shlex.quote(str(out_dir))}")


def plan_cluster(plan: Plan, model: str, model_path: Path, *, ctx: int, max_sessions: int, base_port: int = 7071,
                 hosts: Sequence[HostSpec] = (), slices_dir: str = "slices", key_file: str = "") -> ClusterFile:
    """The cluster file of a plan. ``model`` is what the file names (a built-in name or a path
    relative to the file); ``model_path`` the GGUF itself (the slices are ``<stem>.<a>-<b>.gguf``,
    as ``nak slice`` names them). Each stage listens on ``base_port``, plus one for each earlier
    stage on the same address. ``hosts`` are kept in the file so it can be planned again.

    Raises NakError if a port would exceed 65535.
    """
    # a split model's slices are named by the shards' prefix (nakshatra.gguf.shards), as nak slice does
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", Path(model_path).stem)
    per_address: dict[str, int] = {}
    stages = []
    for s in plan.stages:
        port = base_port + per_address.get(s.host.address, 0)
        per_address[s.host.address] = per_address.get(s.host.address, 0) + 1
        if not 0 < port < 65536:
            raise NakError(f"--port {base_port}: stage ports run to {port}; choose a base port in 1..{65535 - len(plan.stages)}")
        stages.append(StageSpec(host=s.host.address, port=port, layers=s.layers,
                                slice=f"{stem}.{s.layers.inclusive()}.gguf"))
    return ClusterFile(model=model, stages=stages, hosts=list(hosts), key_file=key_file, slices_dir=slices_dir,
                       options={"ctx": ctx, "max_sessions": max_sessions, "mode": plan.mode})


# ---- probing this machine -------------------------------------------------------------------

def available_memory_mb() -> float:
    """Memory available to a new process, MiB: ``MemAvailable`` of /proc/meminfo (Linux), else
    free + inactive pages from ``vm_stat`` (macOS, as the stages count it: cpp/platform/), else
    the free physical pages the OS reports. Raises NakError if none is known."""
    try:
        with open(procfs.PROC / "meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        r = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            return vm_stat_available_bytes(r.stdout) / MIB
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MIB
    except (ValueError, OSError, AttributeError):
        raise NakError("cannot tell this machine's free memory (no /proc/meminfo, vm_stat or "
                       "SC_AVPHYS_PAGES): give mem=MiB yourself") from None


def vm_stat_available_bytes(text: str) -> int:
    """Free + inactive memory from macOS ``vm_stat`` output, bytes: ("Pages free" + "Pages
    speculative" + "Pages inactive") x the page size its first line states (vm_stat shows
    speculative pages apart from free ones; the kernel's free count, which the stages use,
    includes them). Raises ValueError if ``text`` is not vm_stat output."""
    m = re.search(r"page size of (\d+) bytes", text)
    if not m:
        raise ValueError("not vm_stat output: no page size")
    pages = {k.strip(): int(v) for k, v in re.findall(r"^Pages ([a-z -]+):\s+(\d+)\.", text, re.M)}
    if "free" not in pages or "inactive" not in pages:
        raise ValueError("not vm_stat output: no free or inactive page count")
    return (pages["free"] + pages.get("speculative", 0) + pages["inactive"]) * int(m.group(1))


@dataclass(frozen=True)
class Probe:
    """A self-benchmark's result: ``host`` (memory_mb and layers_per_s measured, link_ms the
    DEFAULT_LINK_MS guess), ``decode_ms`` (fastest one-token decode step), ``n_layer``, ``runs``."""

    host: HostSpec
    decode_ms: float
    n_layer: int
    runs: int


def _lan_address() -> str:
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it picks the outgoing address
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


PROBE_WINDOW_S = 0.5
"""Shortest stretch of decode steps the probe times as one: 5 periods of the kernel's default
100 ms CFS period, so a CPU quota (a cgroup's cpu.cfs_quota_us, a container's --cpus) shows in
the figure instead of hiding in the one burst a shorter run fits in."""


def probe_host(model_path: str | os.PathLike[str], *, n_decode: int = 16, budget_s: float = 3.0, threads: int = 0,
               name: str = "", address: str = "") -> Probe:
    """Measure this machine for ``model_path``: load the whole model (llama.cpp, the backend this
    build has), prefill a short prompt, decode 2 tokens (warm-up), then time runs of ``n_decode``
    one-token greedy decode steps, grouped into windows of at least :data:`PROBE_WINDOW_S` seconds
    of decoding each, until ``budget_s`` seconds have passed since the warm-up began (at least one
    window). The fastest window gives ``layers_per_s = n_layer x steps / seconds`` (a busy machine
    only makes windows slower, so the fastest is the least disturbed; a window spans several CPU
    quota periods, so a throttled host cannot look fast by fitting a short run into one burst).
    ``memory_mb`` is :func:`available_memory_mb` (system memory: on a GPU, give the GPU's free
    memory yourself). Takes about ``budget_s`` seconds plus loading.

    Raises SliceError for a missing or non-GGUF file, StageError if llama.cpp cannot load it.
    """
    import socket

    from .. import _nakshatra
    from ..gguf.slicer import model_layout

    layout = model_layout(model_path, sha256="-")
    ref = _nakshatra.Reference(str(layout.path), n_ctx=64, n_threads=threads)  # a split model: shard 1
    prompt = ref.tokenize("The stars are")[:8]
    t0, runs, windows, best_us_per_step = time.monotonic(), 0, 0, math.inf
    ref.time_run(prompt, 2)  # warm-up: first touch of the weights, thread pool start
    while windows < 1 or (time.monotonic() - t0 < budget_s and windows < 20):
        steps, us = 0, 0
        while us < PROBE_WINDOW_S * 1e6:
            _, decode_us = ref.time_run(prompt, n_decode)
            steps, us, runs = steps + n_decode, us + max(decode_us, 1), runs + 1
        best_us_per_step = min(best_us_per_step, us / steps)
        windows += 1
    speed = layout.n_layer / (best_us_per_step / 1e6)
    host = HostSpec(name=name or socket.gethostname() or "this-host", address=address or _lan_address(),
                    memory_mb=round(available_memory_mb()), layers_per_s=round(speed, 1), link_ms=DEFAULT_LINK_MS)
    return Probe(host=host, decode_ms=best_us_per_step / 1e3, n_layer=layout.n_layer, runs=runs)


def host_arg(h: HostSpec) -> str:
    """The ``--host`` value for a host (parsed back by :func:`parse_host`)."""
    return f"{h.name}={h.address},mem={h.memory_mb:g},speed={h.layers_per_s:g},link={h.link_ms:g}"


def host_toml(h: HostSpec) -> str:
    """A ``[[hosts]]`` entry for a cluster file."""
    return (f'[[hosts]]\nname = "{h.name}"\naddress = "{h.address}"\nmemory_mb = {h.memory_mb:g}\n'
            f"layers_per_s = {h.layers_per_s:g}\nlink_ms = {h.link_ms:g}\n")


_SIZE_UNITS = {"": 1.0, "m": 1.0, "mb": 1.0, "mib": 1.0, "g": 1024.0, "gb": 1024.0, "gib": 1024.0}


def parse_host(text: str) -> HostSpec:
    """Parse ``NAME[=ADDRESS],mem=MiB,speed=LAYERS_PER_S[,link=MS]`` (address 127.0.0.1 if left
    out; ``mem`` also takes a G or GiB suffix, e.g. ``mem=15.5G``; link 0 if left out), e.g.
    ``gaming-pc=10.0.0.5,mem=16000,speed=950,link=0.5``.

    Raises NakError naming the bad part and the expected form.
    """
    form = "NAME=ADDRESS,mem=MiB,speed=LAYERS_PER_S,link=MS (e.g. pc=10.0.0.5,mem=16000,speed=950,link=0.5)"
    parts = [p.strip() for p in text.split(",")]
    head = parts[0]
    name, _, address = head.partition("=")
    name, address = name.strip(), address.strip() or "127.0.0.1"
    if not name or head.split("=", 1)[0].strip() in ("mem", "speed", "link"):
        raise NakError(f"--host {text!r}: it must start with the host's name; write {form}")
    vals: dict[str, float] = {}
    for p in parts[1:]:
        key, eq, raw = p.partition("=")
        key, raw = key.strip().lower(), raw.strip().lower()
        if not eq or key not in ("mem", "speed", "link"):
            raise NakError(f"--host {text!r}: unknown part {p!r}; write {form}")
        if key in vals:
            raise NakError(f"--host {text!r}: {key}= is given twice")
        scale = 1.0
        if key == "mem":
            num = raw.rstrip("mgib")
            unit = raw[len(num):]
            if unit not in _SIZE_UNITS:
                raise NakError(f"--host {text!r}: mem={raw}: give MiB, or a G suffix for GiB (mem=16G)")
            raw, scale = num, _SIZE_UNITS[unit]
        elif key == "link" and raw.endswith("ms"):
            raw = raw[:-2]
        try:
            v = float(raw) * scale
        except ValueError:
            raise NakError(f"--host {text!r}: {key}={raw!r} is not a number; write {form}") from None
        if not math.isfinite(v) or v < 0:
            raise NakError(f"--host {text!r}: {key}={raw} must be a number >= 0")
        vals[key] = v
    missing = [k for k in ("mem", "speed") if k not in vals]
    if missing:
        raise NakError(f"--host {text!r}: missing {' and '.join(k + '=' for k in missing)}; write {form} "
                       "(`nak plan MODEL --probe` on that host measures mem and speed)")
    return HostSpec(name=name, address=address, memory_mb=vals["mem"], layers_per_s=vals["speed"],
                    link_ms=vals.get("link", 0.0))


def hosts_from_stages(addresses: Sequence[str], key: bytes | None = None, link_ms: float = 0.0,
                      timeout_s: float = 3.0) -> list[HostSpec]:
    """Hosts as running stages report them in their handshake (``nak serve`` measures itself at
    start): one HostSpec per distinct host, with ``memory_mb`` = the host's MemAvailable plus the
    RSS of its stages (a new plan replaces them), in MiB, and ``layers_per_s`` = the fastest of its
    stages' self-benchmarks (layers x tokens per second; a last stage's also pays the LM head, so
    the fastest is the closest to pure layer speed). ``link_ms`` is given (stages do not measure
    it). Raises NakError naming a stage that does not answer or reported no speed."""
    from .. import _nakshatra
    from ..client.chain import parse_stage_address
    from ..errors import StageError

    by_host: dict[str, dict] = {}
    for a in addresses:
        host, port = parse_stage_address(a)
        try:
            c = _nakshatra.StageClient(host, port, timeout_ms=int(timeout_s * 1000), connect_timeout_ms=2000,
                                       key=key or b"")
            try:
                h = c.hello(client_name="nak-plan")["health"]
            finally:
                c.close()
        except StageError as e:
            raise NakError(f"stage {host}:{port} does not answer ({e}); start it or leave it out of --stages") from None
        if not h.get("layers_per_s"):
            raise NakError(f"stage {host}:{port} reported no speed (an older nak serve?); give that host with --host")
        e = by_host.setdefault(host, {"avail": 0, "rss": 0, "speed": 0.0})
        e["avail"] = max(e["avail"], int(h["mem_available_bytes"]))
        e["rss"] += int(h["rss_bytes"])
        e["speed"] = max(e["speed"], float(h["layers_per_s"]))
    return [HostSpec(name=host, address=host, memory_mb=(e["avail"] + e["rss"]) / 2**20, layers_per_s=e["speed"],
                     link_ms=link_ms) for host, e in by_host.items()]
