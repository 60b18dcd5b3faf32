"""Several hosts: which host serves which layers, and starting them.

- :mod:`.config`: the cluster file (TOML).
- :mod:`.plan`: ``nak plan``, choose the layer ranges per host under a stated cost model.
- :mod:`.up`: ``nak up`` / ``nak down``; :mod:`.fileserver` hands slices to other hosts,
  :mod:`.fetch` downloads them; :mod:`.processes`: pid files and process state.
- :mod:`.discovery`: stages announce themselves on the LAN (DNS-SD over mDNS).

``nakshatra.cluster`` was a module (now :mod:`.config`) before 0.2: its names are still found here,
with a DeprecationWarning, for one release.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from .._moved import forward

    return forward(__name__, name, ("config",))
