"""Emulated hosts on one machine: a weak CPU as a cgroup v1 ``cpu`` quota (``nak bench --hosts``,
and the tests), a small host's memory as a cgroup v1 ``memory`` limit (``python -m
nakshatra.bench.footprint``, the tests). Needs root and the cgroup v1 controllers at
``/sys/fs/cgroup/cpu`` and ``/sys/fs/cgroup/memory``."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from .. import procfs


def _cgroup_missing(root: Path, control_file: str, what: str) -> str:
    """Why a cgroup v1 ``what`` cannot be set under ``root`` ("" when it can)."""
    if os.geteuid() != 0:
        return f"needs root (cgroup v1 {what})"
    if not (root / control_file).exists():
        return f"no cgroup v1 {what.split()[0]} controller at {root}"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable"
    return ""


def cgroup_cpu_missing() -> str:
    """Why a cgroup v1 cpu quota cannot be set here ("" when it can)."""
    return _cgroup_missing(procfs.CGROUP_CPU, "cpu.cfs_quota_us", "cpu quotas")


class _Group:
    """A fresh cgroup v1 group under ``root`` (a controller's directory): ``add`` / ``preexec`` put
    processes in it; ``close()`` moves them back to the root group and removes the group."""

    def __init__(self, root, prefix: str) -> None:
        self.root = root
        self.path = root / f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def preexec(self):
        """A ``preexec_fn`` for :class:`subprocess.Popen` that starts the child inside the group
        (before it loads anything)."""
        procs = self.path / "cgroup.procs"
        return lambda: procs.write_text(str(os.getpid()))

    def close(self) -> None:
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (self.root / "cgroup.procs").write_text(pid)
                except OSError:
                    pass  # exited meanwhile
            self.path.rmdir()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CpuQuota(_Group):
    """A cgroup v1 cpu group holding processes to ``share`` of one CPU: ``cpu.cfs_quota_us`` =
    ``share`` x ``cpu.cfs_period_us`` (period ``period_us``, default 100 ms). Moving a process
    moves all its threads (``cgroup.procs``). ``close()`` moves them back to the root group and
    removes the group."""

    def __init__(self, share: float, period_us: int = 100_000) -> None:
        super().__init__(procfs.CGROUP_CPU, "nak-host")
        (self.path / "cpu.cfs_period_us").write_text(str(period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, int(share * period_us))))

    def throttled_us(self) -> int:
        """Total time the group was held back by its quota (``cpu.stat`` throttled_time), µs."""
        for line in (self.path / "cpu.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "throttled_time":
                return int(v) // 1000
        return 0



def cgroup_memory_missing() -> str:
    """Why a cgroup v1 memory limit cannot be set here ("" when it can)."""
    return _cgroup_missing(procfs.CGROUP_MEMORY, "memory.limit_in_bytes", "memory limits")


class MemoryLimit(_Group):
    """A cgroup v1 memory group: the processes in it may hold at most ``limit_bytes`` of memory
    (``memory.limit_in_bytes``: anonymous pages, the file pages they brought into the page cache
    first, kernel memory charged to them); None leaves it unlimited, to measure. Past the limit
    the kernel reclaims the group's own file pages, then OOM-kills a process of the group (no
    swap here). ``close()`` moves the processes back to the root group and removes the group."""

    def __init__(self, limit_bytes: int | None = None) -> None:
        super().__init__(procfs.CGROUP_MEMORY, "nak-mem")
        if limit_bytes is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))

    def stat(self) -> dict[str, int]:
        """``memory.stat`` as name -> value (bytes, or counts for pg* events)."""
        out = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            out[k] = int(v)
        return out

    def major_faults(self) -> int:
        """Major page faults of the group's processes so far (``total_pgmajfault``): each read a
        page from disk, e.g. a weight page the kernel had to drop to stay under the limit."""
        return self.stat().get("total_pgmajfault", 0)

    def max_usage_bytes(self) -> int:
        """The most memory charged to the group at once (``memory.max_usage_in_bytes``), bytes."""
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this group (``memory.oom_control``
        ``oom_kill``; 0 where the kernel does not count them)."""
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def failcnt(self) -> int:
        """How often a charge hit the limit (``memory.failcnt``); reclaim followed each."""
        return int((self.path / "memory.failcnt").read_text())

