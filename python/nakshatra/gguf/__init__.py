"""Models as files: everything that reads, cuts or finds a GGUF.

- :mod:`.scan`: a lightweight GGUF scanner and little-endian re-encoder (no vocabulary parse).
- :mod:`.slicer`: cut a model into layer-range slices (sub-GGUFs) the patched llama.cpp loads.
- :mod:`.manifest`: the manifest ``nak slice`` writes beside the slices.
- :mod:`.shards`: models published in shards (``llama-gguf-split``), read as one model.
- :mod:`.inspection`, :mod:`.memory`: what a GGUF holds and the memory a stage serving it needs.
- :mod:`.models`: built-in models (PyPI wheels that carry a GGUF); :mod:`.hub`: ``hf:`` and
  ``ollama:`` references; :mod:`.remote`: cut a slice of a remote model with range requests.
- :mod:`.synthetic`: small random-weight models of other architectures, for tests.
"""
