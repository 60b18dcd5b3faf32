"""Separate hosts on one machine: a Linux network namespace per host, each with its own address
on a bridge that the test (the root namespace) also sits on, as on a home LAN.

Needs root (``ip netns``, veth pairs and a bridge work here; ../shared/design/layer-split.md). CI
runs as root and must run these tests: :func:`require_netns` fails under ``CI`` instead of
skipping, and skips with the reason elsewhere.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest


def netns_missing() -> str:
    """Why network namespaces cannot be made here ("" when they can)."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, bridge)"
    if not shutil.which("ip"):
        return "no ip command (iproute2)"
    return ""


def require_netns() -> None:
    why = netns_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test but cannot: {why}")
        pytest.skip(why)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Hosts:
    """``n`` emulated hosts ``hosts[i]`` = ``10.A.B.(i + 1)`` in namespaces ``names[i]``, bridged
    with the root namespace at ``10.A.B.254``. ``wrap(i)`` is the command prefix that runs a
    process on host ``i``. ``close()`` removes everything (namespaces end their processes' network;
    kill the processes first)."""

    def __init__(self, n: int) -> None:
        tag = f"{os.getpid() % 1000:03d}{random.randrange(100):02d}"
        a, b = random.randrange(16, 250), random.randrange(1, 250)
        self.bridge = f"nakbr{tag}"
        self.names = [f"nak{tag}h{i}" for i in range(n)]
        self.hosts = [f"10.{a}.{b}.{i + 1}" for i in range(n)]
        self.root = f"10.{a}.{b}.254"
        self._veths: list[str] = []
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.root}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, ns in enumerate(self.names):
                _ip("netns", "add", ns)
                outside, inside = f"nv{tag}{i}", f"nv{tag}{i}p"
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                self._veths.append(outside)
                _ip("link", "set", inside, "netns", ns)
                _ip("link", "set", outside, "master", self.bridge)
                _ip("link", "set", outside, "up")
                _ip("-n", ns, "addr", "add", f"{self.hosts[i]}/24", "dev", inside)
                _ip("-n", ns, "link", "set", inside, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def wrap(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def close(self) -> None:
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for v in self._veths:
            subprocess.run(["ip", "link", "del", v], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
