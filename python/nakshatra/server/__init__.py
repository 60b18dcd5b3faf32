"""The stage side: a process that loads one slice into the C++ stage and runs its event loop.

- :mod:`.serve`: ``nak serve`` (one stage; options in :class:`~nakshatra.server.serve.ServeOptions`).
- :mod:`.local`: stages as local processes (``nak run`` without ``--chain``, tests, benchmarks).
"""
