"""Emulated hosts on one machine: a weak CPU as a cgroup v1 ``cpu`` quota (``nak bench --hosts``,
and the tests). Needs root and the cgroup v1 cpu controller at ``/sys/fs/cgroup/cpu``."""

from __future__ import annotations

import os
import uuid

from . import procfs


def cgroup_cpu_missing() -> str:
    """Why a cgroup v1 cpu quota cannot be set here ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root (cgroup v1 cpu quotas)"
    if not (procfs.CGROUP_CPU / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {procfs.CGROUP_CPU}"
    if not os.access(procfs.CGROUP_CPU, os.W_OK):
        return f"{procfs.CGROUP_CPU} is not writable"
    return ""


class CpuQuota:
    """A cgroup v1 cpu group holding processes to ``share`` of one CPU: ``cpu.cfs_quota_us`` =
    ``share`` x ``cpu.cfs_period_us`` (period ``period_us``, default 100 ms). Moving a process
    moves all its threads (``cgroup.procs``). ``close()`` moves them back to the root group and
    removes the group."""

    def __init__(self, share: float, period_us: int = 100_000) -> None:
        self.path = procfs.CGROUP_CPU / f"nak-host-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text(str(period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, int(share * period_us))))

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def preexec(self):
        """A ``preexec_fn`` for :class:`subprocess.Popen` that starts the child inside the group
        (before it loads anything)."""
        procs = self.path / "cgroup.procs"
        return lambda: procs.write_text(str(os.getpid()))

    def throttled_us(self) -> int:
        """Total time the group was held back by its quota (``cpu.stat`` throttled_time), µs."""
        for line in (self.path / "cpu.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "throttled_time":
                return int(v) // 1000
        return 0

    def close(self) -> None:
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (procfs.CGROUP_CPU / "cgroup.procs").write_text(pid)
                except OSError:
                    pass  # exited meanwhile
            self.path.rmdir()
        except OSError:
            pass

    def __enter__(self) -> CpuQuota:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
