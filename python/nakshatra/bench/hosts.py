"""``nak bench --hosts fast=1.0,slow=0.25``: mismatched hosts emulated on one machine, planned and
measured.

Each emulated host is a cgroup v1 CPU quota (:class:`nakshatra.bench.hostemu.CpuQuota`: ``share`` of one
CPU) and a memory budget (a stage's fixed overhead plus ``mem_fraction`` of the model's weights
and KV, so that no host holds it alone and the plan must split). Then, in one run:

1. ``nak plan --probe`` (:func:`nakshatra.cluster.plan.probe_host`, one thread) runs inside each host's
   quota and gives its measured layers/s;
2. :func:`nakshatra.cluster.plan.plan_chain` assigns layer ranges from those figures; the even split gives
   every host the same number of layers (the same host order);
3. both chains run as local stages, each stage in its host's quota (one thread), and their ring
   decode speed is measured side by side, interleaved repetition by repetition.

Needs root and the cgroup v1 cpu controller (raises NakError saying so otherwise).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import NakError
from ..ranges import LayerRange

CTX = 256
PROMPT_TOKENS = 16


def parse_hosts(text: str) -> dict[str, float]:
    """``"fast=1.0,slow=0.25"`` → ``{"fast": 1.0, "slow": 0.25}`` (shares of one CPU, 0.01..1).

    Raises NakError naming the bad part."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, share = part.partition("=")
        try:
            v = float(share)
        except ValueError:
            v = -1.0
        if not eq or not name.strip() or not 0.01 <= v <= 1.0:
            raise NakError(f"--hosts {text!r}: write NAME=SHARE,... with SHARE the part of one CPU in "
                           "[0.01, 1], e.g. --hosts fast=1.0,slow=0.25")
        if name.strip() in out:
            raise NakError(f"--hosts {text!r}: host {name.strip()!r} is given twice")
        out[name.strip()] = v
    if len(out) < 2:
        raise NakError(f"--hosts {text!r}: give at least two hosts, e.g. --hosts fast=1.0,slow=0.25")
    return out


def _probe_in(quota, model: Path, budget_s: float) -> float:
    """layers/s of ``model`` measured by :func:`nakshatra.cluster.plan.probe_host` in a process started
    inside ``quota`` (one llama.cpp thread)."""
    code = ("import json, sys; from nakshatra.cluster.plan import probe_host; "
            "p = probe_host(sys.argv[1], threads=1, budget_s=float(sys.argv[2])); "
            "print(json.dumps({'layers_per_s': p.host.layers_per_s}))")
    r = subprocess.run([sys.executable, "-c", code, str(model), str(budget_s)], capture_output=True, text=True,
                       timeout=600, stdin=subprocess.DEVNULL, preexec_fn=quota.preexec())
    if r.returncode != 0:
        raise NakError(f"the probe failed inside an emulated host: {r.stderr.strip()[-400:]}")
    return float(json.loads(r.stdout.strip().splitlines()[-1])["layers_per_s"])


def even_ranges(n_layer: int, n: int) -> list[LayerRange]:
    """``n`` contiguous ranges of ``n_layer`` layers, sizes differing by at most one."""
    cuts = [round(i * n_layer / n) for i in range(n + 1)]
    return [LayerRange(a, b) for a, b in zip(cuts, cuts[1:])]


def _decode_tps(addresses: list[str], n_decode: int) -> float:
    """Ring decode tokens/s of one greedy session (a fixed prompt, end-of-generation ignored)."""
    from ..client.chain import Chain, SamplerParams

    with Chain(addresses, ring=True, timeout_s=600) as c:
        prompt = [1 + (i * 7919) % 20000 for i in range(PROMPT_TOKENS)]
        with c.session(SamplerParams(temp=0.0), n_predict=n_decode, ignore_eog=True) as s:
            t1 = None
            n = 0
            for _ in s.ring(prompt, n_decode):
                n += 1
                if t1 is None:
                    t1 = time.perf_counter()
            return (n - 1) / (time.perf_counter() - t1) if n > 1 else 0.0


def run_hosts_bench(model: Path, shares: dict[str, float], *, mem_fraction: float = 0.7, n_decode: int = 32,
                    reps: int = 3, probe_s: float = 3.0,
                    status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Probe, plan and measure ``model`` on emulated hosts ``shares`` (name → share of one CPU).

    Returns ``{"hosts": [{name, share, memory_mb, layers_per_s, planned, even}], "planned": {ranges,
    decode_tps}, "even": {...}, "ratio_planned_over_even", "plan_ms_per_token", "config"}``;
    decode_tps as ``{"median", "spread", "values"}`` in tokens/s. Raises NakError without root or
    cgroup v1, or when the plan cannot place the model.
    """
    from ..cluster.plan import HostSpec, model_memory, plan_chain
    from ..gguf.slicer import slice_model
    from ..server.local import LocalStages
    from .hostemu import CpuQuota, cgroup_cpu_missing

    why = cgroup_cpu_missing()
    if why:
        raise NakError(f"nak bench --hosts emulates hosts with cgroup CPU quotas and cannot here: {why}")
    say = status or (lambda text: None)
    mem = model_memory(model, ctx=CTX, max_sessions=1)
    everything = LayerRange(0, mem.n_layer)
    whole = mem.stage_bytes(everything)
    # a stage's fixed cost, plus mem_fraction of everything else the model needs
    memory_mb = (mem.stage_fixed(everything) + mem_fraction * (whole - mem.stage_fixed(everything))) / 2**20
    quotas = {name: CpuQuota(share) for name, share in shares.items()}
    try:
        speeds = {}
        for name, q in quotas.items():
            say(f"probing {name} ({shares[name]:g} of a CPU)")
            speeds[name] = _probe_in(q, model, probe_s)
        hosts = [HostSpec(name=n, address="127.0.0.1", memory_mb=memory_mb, layers_per_s=speeds[n], link_ms=0.1)
                 for n in shares]
        plan = plan_chain(mem, hosts, mode="ring")
        order = [s.host.name for s in plan.stages]
        planned = {s.host.name: s.layers for s in plan.stages}
        even = dict(zip(order, even_ranges(mem.n_layer, len(order))))
        res_hosts = [{"name": n, "share": shares[n], "memory_mb": round(memory_mb), "layers_per_s": speeds[n],
                      "planned": planned[n].inclusive() if n in planned else "",
                      "planned_layers": planned[n].n_layers if n in planned else 0,
                      "even": even[n].inclusive() if n in even else ""} for n in shares]
        with tempfile.TemporaryDirectory(prefix="nak-hosts-") as d:
            chains = {}
            for label, ranges in (("planned", planned), ("even", even)):
                m = slice_model(model, [ranges[n] for n in order], out_dir=Path(d) / label, progress=False)
                chains[label] = [Path(d) / label / s.file for s in m.slices]
            stages = {label: LocalStages(paths, threads=1, ctx=CTX, max_sessions=1, cpu_lock=False)
                      for label, paths in chains.items()}
            try:
                for label, ls in stages.items():
                    say(f"starting the {label} chain")
                    ls.start()
                    for name, pid in zip(order, ls.pids):
                        quotas[name].add(pid)
                tps: dict[str, list[float]] = {"planned": [], "even": []}
                for rep in range(reps + 1):  # the first round warms up and is not counted
                    for label in ("even", "planned"):
                        say(f"decode, {label} chain, round {rep + 1} of {reps + 1}")
                        v = _decode_tps(stages[label].addresses, n_decode)
                        if rep > 0:
                            tps[label].append(v)
            finally:
                for ls in stages.values():
                    ls.stop()
    finally:
        for q in quotas.values():
            q.close()

    def stat(v: list[float]) -> dict[str, Any]:
        return {"median": statistics.median(v), "spread": max(v) - min(v), "values": v}

    out = {"config": {"model": str(model), "mem_fraction": mem_fraction, "n_decode": n_decode, "reps": reps,
                      "ctx": CTX, "threads_per_stage": 1},
           "hosts": res_hosts, "plan_ms_per_token": plan.total_ms,
           "planned": {"ranges": [planned[n].inclusive() for n in order], "decode_tps": stat(tps["planned"])},
           "even": {"ranges": [even[n].inclusive() for n in order], "decode_tps": stat(tps["even"])}}
    out["ratio_planned_over_even"] = out["planned"]["decode_tps"]["median"] / out["even"]["decode_tps"]["median"]
    return out
