"""Nakshatra: run one GGUF model split by layer ranges across several machines.

The compiled core is :mod:`nakshatra._nakshatra` (C++: stage executor, event loop, protocol
client). The Python packages are shaped like the system (docs/architecture.md):

- :mod:`.gguf`: models as files (scan, slice, manifest, shards, inspection, built-in and hub models);
- :mod:`.client`: the chain client and ``nak api``;
- :mod:`.server`: ``nak serve`` and local stage processes;
- :mod:`.cluster`: the cluster file, the planner, ``nak up``, discovery;
- :mod:`.bench`: benchmarks and the emulation they need (link delay, slow hosts);
- at the top only what everything uses: :mod:`.errors`, :mod:`.paths`, :mod:`.ranges`,
  :mod:`.auth`, :mod:`.build`, :mod:`.procfs`, :mod:`.subprocesses`.

The flat names from before 0.2 (``nakshatra.slicer``, ``python -m nakshatra.linkdelay``) still
work for one release (:mod:`._moved`).

Example::

    from nakshatra import Chain, SamplerParams
    with Chain(["127.0.0.1:7071", "127.0.0.1:7072"]) as chain:
        for text in chain.generate("Tell me about the stars", n_predict=64,
                                   sampler=SamplerParams(temp=0)):
            print(text, end="")
"""

from __future__ import annotations

from typing import Any

from . import _moved
from .errors import ChainError, NakError, RangeError, SliceError, StageError

_moved.install()

__version__ = "0.1.0"

__all__ = ["Chain", "SamplerParams", "GenerationStats", "NakError", "ChainError", "RangeError",
           "SliceError", "StageError", "__version__"]


def __getattr__(name: str) -> Any:
    # the chain needs the compiled extension; import it only when asked for
    if name in ("Chain", "SamplerParams", "GenerationStats"):
        from .client import chain

        return getattr(chain, name)
    raise AttributeError(name)
