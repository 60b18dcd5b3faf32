"""Measurements and the emulation they need (``nak bench``, ``nak soak``).

- :mod:`.side_by_side`: the unsplit model in one process against a chain of local stages, side by side.
- :mod:`.links`: concurrent sessions, emulated slow links, wire formats, speculative decoding,
  pipelined prefill.
- :mod:`.rpc_baseline`: llama.cpp's own RPC split; :mod:`.upstream`: stock llama.cpp as an oracle.
- :mod:`.linkdelay`: a user-space link-delay relay; :mod:`.hostemu`: slow and small hosts as
  cgroups; :mod:`.hosts`: mismatched hosts planned and measured; :mod:`.footprint`: a stage's
  memory footprint; :mod:`.swa`: the sliding-window KV; :mod:`.soak`: many sessions for a while;
  :mod:`.workloads`: the speculative-decoding workloads.

``nakshatra.bench`` was a module (now :mod:`.side_by_side` and :mod:`.links`) before 0.2: its names are
still found here, with a DeprecationWarning, for one release.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from .._moved import forward

    return forward(__name__, name, ("side_by_side", "links"))
