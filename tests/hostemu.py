"""Emulated hosts for tests: a weak CPU as a cgroup v1 ``cpu`` quota on this one machine.

CI runs as root, where ``/sys/fs/cgroup/cpu`` is writable (../shared/design/layer-split.md); a
test that needs it must run there, so :func:`require_cgroup_cpu` fails under ``CI`` instead of
skipping, and skips with the reason elsewhere.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

CPU_ROOT = Path("/sys/fs/cgroup/cpu")


def cgroup_cpu_missing() -> str:
    """Why a cgroup v1 cpu quota cannot be set here ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root (cgroup v1 cpu quotas)"
    if not (CPU_ROOT / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CPU_ROOT}"
    if not os.access(CPU_ROOT, os.W_OK):
        return f"{CPU_ROOT} is not writable"
    return ""


def require_cgroup_cpu() -> None:
    """Skip (with the reason) when cpu quotas are unavailable; under CI, fail instead: CI runs as
    root and must run these tests."""
    why = cgroup_cpu_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test but cannot: {why}")
        pytest.skip(why)


class CpuQuota:
    """A cgroup v1 cpu group holding processes to ``share`` of one CPU: ``cpu.cfs_quota_us`` =
    ``share`` x ``cpu.cfs_period_us`` (period ``period_us``, default 100 ms). Moving a process
    moves all its threads (``cgroup.procs``). ``close()`` moves them back to the root group and
    removes the group."""

    def __init__(self, share: float, period_us: int = 100_000) -> None:
        self.path = CPU_ROOT / f"nak-test-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text(str(period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, int(share * period_us))))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

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
                    (CPU_ROOT / "cgroup.procs").write_text(pid)
                except OSError:
                    pass  # exited meanwhile
            self.path.rmdir()
        except OSError:
            pass

    def __enter__(self) -> CpuQuota:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
