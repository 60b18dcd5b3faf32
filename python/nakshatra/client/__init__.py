"""The client side: what talks to a chain of stages.

- :mod:`.chain`: validate a chain, open sessions, run prefill and decode, sample, stream text
  (:class:`~nakshatra.client.chain.Chain`).
- :mod:`.api`: ``nak api``, the OpenAI-compatible HTTP server and its dashboard (``web/``).
"""
