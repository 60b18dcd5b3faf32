"""Emulated hosts for tests (python/nakshatra/hostemu.py): CI runs as root, where
``/sys/fs/cgroup/cpu`` is writable (../shared/design/layer-split.md); a test that needs it must run
there, so :func:`require_cgroup_cpu` fails under ``CI`` instead of skipping, and skips with the
reason elsewhere.
"""

from __future__ import annotations

import os

import pytest
from nakshatra.hostemu import CpuQuota, cgroup_cpu_missing

__all__ = ["CpuQuota", "cgroup_cpu_missing", "require_cgroup_cpu"]


def require_cgroup_cpu() -> None:
    """Skip (with the reason) when cpu quotas are unavailable; under CI, fail instead: CI runs as
    root and must run these tests."""
    why = cgroup_cpu_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test but cannot: {why}")
        pytest.skip(why)
