"""Emulated hosts for tests (python/nakshatra/bench/hostemu.py): CI runs as root, where
``/sys/fs/cgroup/cpu`` is writable (../shared/design/layer-split.md); a test that needs it must run
there, so :func:`require_cgroup_cpu` fails under ``CI`` instead of skipping, and skips with the
reason elsewhere.
"""

from __future__ import annotations

import os

import pytest

from nakshatra.bench.hostemu import CpuQuota, MemoryLimit, cgroup_cpu_missing, cgroup_memory_missing

__all__ = ["CpuQuota", "MemoryLimit", "cgroup_cpu_missing", "cgroup_memory_missing", "require_cgroup_cpu",
           "require_cgroup_memory"]


def require_cgroup_cpu() -> None:
    """Skip (with the reason) when cpu quotas are unavailable; under CI, fail instead: CI runs as
    root and must run these tests."""
    why = cgroup_cpu_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test but cannot: {why}")
        pytest.skip(why)


def require_cgroup_memory() -> None:
    """As :func:`require_cgroup_cpu`, for cgroup v1 memory limits."""
    why = cgroup_memory_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test but cannot: {why}")
        pytest.skip(why)
