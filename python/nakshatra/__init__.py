"""Nakshatra: run one GGUF model split by layer ranges across several machines.

The compiled core is :mod:`nakshatra._nakshatra` (C++: stage executor, event loop, protocol
client). Pure-Python modules: :mod:`.slicer` (cut a GGUF into layer-range slices), :mod:`.chain`
(the client: validate a chain, run sessions, sample, stream text), :mod:`.serve` (a stage
process), :mod:`.local` (local stage processes), :mod:`.models` (built-in models).

Example::

    from nakshatra import Chain, SamplerParams
    with Chain(["127.0.0.1:7071", "127.0.0.1:7072"]) as chain:
        for text in chain.generate("Tell me about the stars", n_predict=64,
                                   sampler=SamplerParams(temp=0)):
            print(text, end="")
"""

from __future__ import annotations

from typing import Any

from .errors import ChainError, NakError, RangeError, SliceError, StageError

__version__ = "0.1.0"

__all__ = ["Chain", "SamplerParams", "GenerationStats", "NakError", "ChainError", "RangeError",
           "SliceError", "StageError", "__version__"]


def __getattr__(name: str) -> Any:
    # the chain needs the compiled extension; import it only when asked for
    if name in ("Chain", "SamplerParams", "GenerationStats"):
        from . import chain

        return getattr(chain, name)
    raise AttributeError(name)
