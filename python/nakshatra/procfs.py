"""Where the package reads Linux ``/proc``, and what it says on a machine without one (macOS).

The readers (:func:`nakshatra.bench.side_by_side.proc_status_bytes`, :func:`nakshatra.cluster.plan.available_memory_mb`,
the descriptor counts of :mod:`nakshatra.bench.soak`, :func:`nakshatra.cluster.processes._identity`) build their paths
from :data:`PROC` when called, so a test can point it at an empty folder to see each degrade.
Without /proc each one either uses a macOS way to the same answer (``vm_stat``, ``ps``) or says
plainly that the feature needs Linux /proc (:func:`needs_proc`): none crashes, and no zero it
could not measure passes for a measurement (``nak soak`` refuses to run, ``nak bench`` shows a
stage's peak RSS as "n/a: needs Linux /proc"; its JSON keeps 0, documented as unknown).
"""

from __future__ import annotations

import sys
from pathlib import Path

PROC = Path("/proc")
"""The proc file system's mount point (Linux)."""


def available() -> bool:
    """Whether this machine has a Linux /proc mounted at :data:`PROC` (``PROC/self`` exists)."""
    return (PROC / "self").is_dir()


def needs_proc(feature: str) -> str:
    """The message for ``feature`` where there is no /proc: ``"<feature> needs Linux /proc ..."``."""
    return f"{feature} needs Linux /proc, which this machine ({sys.platform}) does not have"

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
"""The cgroup v1 cpu controller's mount point (Linux): :mod:`nakshatra.bench.hostemu` makes CPU quotas
there to emulate a weak host (``nak bench --hosts``)."""

CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
"""The cgroup v1 memory controller's mount point (Linux): :mod:`nakshatra.bench.hostemu` makes memory
limits there (``python -m nakshatra.bench.footprint`` measures a stage's footprint under them)."""

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where cgroups are mounted (Linux): a cgroup v2 group's ``memory.max`` lives under it
(:func:`nakshatra.server.swap.available_bytes` reads the room a stage's group has left)."""
