"""Moving every stage of a chain to another model in place: the client's side of
:mod:`nakshatra.server.swap` (``nak api``'s ``POST /api/models/{name}/load``).

The swap is a two-phase commit over the stages, so that no failure leaves the chain split between
two models:

1. **prepare**: every stage (replicas too) loads its slice of the new model beside the old one, in
   parallel, after checking that it fits in its host's memory. The old model serves meanwhile.
   Any stage that refuses, fails to load, dies or stops answering: every stage frees what it
   loaded (``release``) and the old model goes on serving; :class:`SwapError` names the stage.
2. **swap**: when every stage is ready (and the caller has drained its generations, the
   ``before_swap`` callback), each stage switches to the new slice between two requests. A stage
   that fails here: the stages already switched switch back (the old slice is still loaded), then
   every stage releases the new one.
3. **release**: every stage frees the old slice.

Swap time is measured from the first prepare to the last swap (:class:`SwapReport`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import NakError, StageError

POLL_S = 0.2
"""How often each stage's load is polled (``status``), seconds."""


@dataclass
class StageSwap:
    """One stage's part in a swap: ``address`` (``host:port``), ``spec`` (its prepare request:
    ``model``, ``layers`` inclusive, optional ``sha256``/``fetch``), and what it is doing:
    ``state`` (``waiting``, ``preparing``, ``loading``, ``ready``, ``swapped``, ``done``,
    ``failed``, ``rolled back``), ``progress`` (0..1 of its weights loaded), ``error``, its
    memory check (``need_bytes``, ``available_bytes``) and where its load's time went
    (``timings_ms``, see :mod:`nakshatra.server.swap`)."""

    address: str
    spec: dict[str, Any]
    state: str = "waiting"
    progress: float = 0.0
    error: str = ""
    need_bytes: int = 0
    available_bytes: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)

    def where(self) -> str:
        return f"stage {self.address} (layers {self.spec.get('layers')} of {self.spec.get('model')})"


@dataclass
class SwapReport:
    """A finished swap: the stages, ``load_ms`` (first prepare to every stage ready), ``drain_ms``
    (the caller's ``before_swap``), ``switch_ms`` (the switch on every stage) and ``total_ms``."""

    stages: list[StageSwap] = field(default_factory=list)
    load_ms: float = 0.0
    drain_ms: float = 0.0
    switch_ms: float = 0.0
    total_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SwapError(NakError):
    """A swap that did not happen: ``stage`` is the address of the stage that failed it (or "");
    every stage that answers serves the old model again."""

    def __init__(self, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage


def control(address: str, request: dict[str, Any], key: bytes | None, timeout_s: float = 10.0) -> dict[str, Any]:
    """One CONTROL request to the stage at ``address`` (a fresh connection: a swap closes it) and
    its JSON reply as a dict. Raises StageError when the stage cannot be reached or refuses the
    frame (a stage started with ``--no-swap``)."""
    from .. import _nakshatra
    from .chain import parse_stage_address

    host, port = parse_stage_address(address)
    ms = int(timeout_s * 1000)
    c = _nakshatra.StageClient(host, port, timeout_ms=ms, connect_timeout_ms=min(ms, 5000), key=key or b"")
    try:
        c.hello(client_name="nak-swap")
        return json.loads(c.control(json.dumps(request)))
    finally:
        c.close()


def _update(s: StageSwap, reply: dict[str, Any]) -> None:
    s.progress = float(reply.get("progress") or 0.0)
    s.need_bytes = int(reply.get("need_bytes") or 0)
    s.available_bytes = int(reply.get("available_bytes") or 0)
    s.timings_ms = dict(reply.get("timings_ms") or {})
    st = reply.get("state", "")
    if st in ("preparing", "loading", "ready"):
        s.state = st
    elif st == "failed":
        s.state, s.error = "failed", str(reply.get("error") or "the load failed")


def swap_stages(targets: Sequence[tuple[str, dict[str, Any]]], key: bytes | None = None,
                load_timeout_s: float = 600.0, timeout_s: float = 10.0,
                on_update: Callable[[list[StageSwap]], None] | None = None,
                before_swap: Callable[[], None] | None = None) -> SwapReport:
    """Move every stage in ``targets`` (``(address, prepare request)``: every stage of the chain,
    replicas included) to the new model, as the module docstring says. ``on_update(stages)`` is
    called whenever a stage's state or progress changes (the dashboard); ``before_swap()`` once
    every stage is ready, just before the switch (drain the generations of the old model there;
    an exception it raises aborts the swap like a failed stage). ``load_timeout_s`` bounds the
    loads, ``timeout_s`` each request.

    Raises SwapError (naming the stage and why) when the swap does not happen; every stage that
    answers then serves the old model.
    """
    stages = [StageSwap(a, dict(spec)) for a, spec in targets]
    report = SwapReport(stages=stages)
    notify = on_update or (lambda _s: None)
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=max(1, len(stages)), thread_name_prefix="nak-swap")
    try:
        _prepare_all(stages, key, timeout_s, pool, notify)
        _wait_ready(stages, key, timeout_s, load_timeout_s, pool, notify)
        report.load_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        if before_swap is not None:
            try:
                before_swap()
            except Exception as e:  # noqa: BLE001 - the swap is abandoned, the old model stays
                raise SwapError(f"the swap was abandoned before switching: {e}") from None
        report.drain_ms = (time.perf_counter() - t1) * 1e3
        t2 = time.perf_counter()
        _switch_all(stages, key, timeout_s, notify)
        report.switch_ms = (time.perf_counter() - t2) * 1e3
    except SwapError:
        _roll_back(stages, key, timeout_s, pool, notify)
        raise
    finally:
        pool.shutdown(wait=False)
    report.total_ms = (time.perf_counter() - t0) * 1e3
    for s in stages:  # free the old model everywhere; a stage that misses it frees it at the next swap
        try:
            control(s.address, {"op": "release"}, key, timeout_s)
            s.state = "done"
        except StageError as e:
            s.state, s.error = "done", f"the old model stays loaded beside the new one: {e}"
    notify(stages)
    return report


def _prepare_all(stages: list[StageSwap], key: bytes | None, timeout_s: float, pool: ThreadPoolExecutor,
                 notify: Callable[[list[StageSwap]], None]) -> None:
    def one(s: StageSwap) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                r = control(s.address, {"op": "prepare", **s.spec}, key, timeout_s)
            except StageError as e:
                s.state, s.error = "failed", (f"refused: {e}" if e.code == "bad_request" else f"did not answer: {e}")
                return
            if r.get("ok") or not r.get("retry") or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)  # the stage is still stopping a released load (a swap rolled back just now)
        if not r.get("ok"):
            s.state, s.error = "failed", str(r.get("error") or "refused")
        else:
            _update(s, r)

    list(pool.map(one, stages))
    notify(stages)
    _raise_failed(stages)


def _raise_failed(stages: list[StageSwap]) -> None:
    for s in stages:
        if s.state == "failed":
            raise SwapError(f"{s.where()}: {s.error}; every stage keeps the model it serves", s.address)


def _wait_ready(stages: list[StageSwap], key: bytes | None, timeout_s: float, load_timeout_s: float,
                pool: ThreadPoolExecutor, notify: Callable[[list[StageSwap]], None]) -> None:
    deadline = time.monotonic() + load_timeout_s

    def one(s: StageSwap) -> None:
        if s.state == "ready":
            return
        try:
            _update(s, control(s.address, {"op": "status"}, key, timeout_s))
        except StageError as e:
            s.state, s.error = "failed", f"went away while loading: {e}"

    while True:
        list(pool.map(one, stages))
        notify(stages)
        _raise_failed(stages)
        if all(s.state == "ready" for s in stages):
            return
        if time.monotonic() > deadline:
            slow = next(s for s in stages if s.state != "ready")
            slow.state, slow.error = "failed", f"not loaded within {load_timeout_s:.0f} s"
            _raise_failed(stages)
        time.sleep(POLL_S)


def _switch_all(stages: list[StageSwap], key: bytes | None, timeout_s: float,
                notify: Callable[[list[StageSwap]], None]) -> None:
    for s in stages:
        try:
            r = control(s.address, {"op": "swap"}, key, timeout_s)
        except StageError as e:
            s.state, s.error = "failed", f"did not switch: {e}"
        else:
            if r.get("ok"):
                s.state = "swapped"
            else:
                s.state, s.error = "failed", f"did not switch: {r.get('error')}"
        notify(stages)
        _raise_failed(stages)


def _roll_back(stages: list[StageSwap], key: bytes | None, timeout_s: float, pool: ThreadPoolExecutor,
               notify: Callable[[list[StageSwap]], None]) -> None:
    """Every stage back on the old model: a switched one switches back, then each frees the new
    slice (a load that runs is cancelled). A stage that does not answer is skipped: it is dead or
    cut off, and its own error is already the one reported."""
    def one(s: StageSwap) -> None:
        try:
            if s.state == "swapped":
                control(s.address, {"op": "swap"}, key, timeout_s)
            control(s.address, {"op": "release"}, key, timeout_s)
            if s.state != "failed":
                s.state = "rolled back"
        except StageError:
            pass

    list(pool.map(one, stages))
    notify(stages)
