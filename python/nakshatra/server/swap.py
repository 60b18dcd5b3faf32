"""The stage's side of an in-place model swap: the CONTROL requests ``nak api`` sends.

A stage loads the new model's slice **beside** the one it serves, and the event loop switches
between the two in one step between requests (``cpp/stage/server.cpp: run_control``). Nothing of
the old model is freed until the client says so, so a swap that fails anywhere in the cluster
leaves, or puts back, every stage on the old model at once. Requests (JSON, one per CONTROL frame):

``{"op": "status"}``
    The reply of every op: ``state`` (``idle``, ``preparing``: making the slice and checking its
    memory; ``loading``; ``ready``: the new slice is loaded and waits; ``failed``), ``progress``
    (0..1 of the weights loaded), ``error``, ``active`` and ``pending`` (the model served and the
    one loaded beside it: ``model``, ``layers``, ``model_sha256``, ``path``), ``host``, the
    memory figures of the last check (``need_bytes``, ``available_bytes``) and ``timings_ms`` of
    the last prepare (``slice_ms``: making or checking the slice, ``memory_check_ms``,
    ``load_ms``: llama.cpp loading it).
``{"op": "prepare", "model": M, "layers": "A-B", "sha256": "", "model_sha256": "", "fetch": []}``
    Start loading ``layers`` (inclusive) of model ``M`` (a built-in name, a GGUF path on this host,
    an ``hf:`` reference or an http(s) URL, as ``nak serve`` takes them; ``fetch``/``sha256`` as
    ``nak serve --fetch``) on a thread of its own. Before anything is loaded its memory is checked:
    :func:`nakshatra.gguf.memory.predict_stage` of the slice (without the process baseline, which
    the stage already pays) must fit in :func:`available_bytes`, beside the model served now, and
    its GPU buffers (``device_bytes``) in the GPUs' free memory (``build_info()["devices"]``).
    Refused (``ok`` false) while a load runs or a loaded slice waits: release it first.
``{"op": "swap"}``
    Serve the loaded slice from now on; the old one becomes the pending one, so a second swap goes
    back. Every connection closes (their sessions were the old model's). Refused unless ``ready``.
``{"op": "release"}``
    Free the pending slice (the new one after a failed swap elsewhere, the old one after a
    successful swap), or cancel a load that runs (llama.cpp's progress callback says stop).

Every reply has ``ok`` (false with ``error`` for a refused request; ``retry`` true when the same
request will be taken in a moment: a released load is still stopping).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import NakError

MIB = 1 << 20


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cgroup_room() -> int | None:
    """Bytes this process's memory cgroup can still charge before its limit (limit - usage, the
    inactive file pages counted as free: the kernel reclaims them first), or None without a limit
    or without Linux cgroups. cgroup v1 (``memory.limit_in_bytes``) and v2 (``memory.max``)."""
    from .. import procfs

    try:
        lines = (procfs.PROC / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):  # v1
            base = procfs.CGROUP_MEMORY / path.lstrip("/")
            limit, usage = _read_int(base / "memory.limit_in_bytes"), _read_int(base / "memory.usage_in_bytes")
            if limit is None or usage is None or limit >= 1 << 60:
                return None
            inactive = 0
            try:
                for s in (base / "memory.stat").read_text().splitlines():
                    k, _, v = s.partition(" ")
                    if k == "total_inactive_file":
                        inactive = int(v)
            except (OSError, ValueError):
                pass
            return max(0, limit - usage + inactive)
        if ctrls == "" and line.startswith("0::"):  # v2
            base = procfs.CGROUP_ROOT / path.lstrip("/")
            try:
                limit_txt = (base / "memory.max").read_text().strip()
            except OSError:
                continue
            usage = _read_int(base / "memory.current")
            if limit_txt == "max" or usage is None:
                return None
            return max(0, int(limit_txt) - usage)
    return None


def available_bytes() -> int:
    """Memory this stage could still allocate, bytes: what the host could give without swapping
    (:func:`nakshatra.cluster.plan.available_memory_mb`: ``MemAvailable``, or free + inactive pages
    on macOS), or less when the process's memory cgroup has less room left. 0 when unknown."""
    from ..cluster.plan import available_memory_mb

    try:
        avail = int(available_memory_mb() * MIB)
    except Exception:  # noqa: BLE001 - unknown: the check then relies on the cgroup, if any
        avail = 0
    room = _cgroup_room()
    if room is not None:
        avail = min(avail, room) if avail else room
    return avail


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


class SwapController:
    """Answers a stage's CONTROL requests (see the module docstring): ``controller(request_json)``
    returns ``(reply_json, Stage or None)`` as ``_nakshatra.Stage.serve(control=...)`` wants.

    ``stage``: the ``_nakshatra.Stage`` being served (after a swap it holds the new slice);
    ``opts``: the stage's :class:`~nakshatra.server.options.ServeOptions` (the new slice is loaded
    with the same ones); ``key``: the cluster key (for a fetch from ``nak up``'s file server);
    ``active``: what it serves now (``model``, ``layers``, ``model_sha256``, ``path``);
    ``on_swap(info)``: called after each swap with the new ``active`` (the mDNS announcement).
    """

    def __init__(self, stage: Any, opts: Any, key: bytes | None, active: dict[str, Any],
                 on_swap: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.stage, self.opts, self.key = stage, opts, key
        self.active = dict(active)
        self.on_swap = on_swap
        self._lock = threading.Lock()
        self._state = "idle"
        self._progress = 0.0
        self._error = ""
        self._pending: Any = None  # a loaded _nakshatra.Stage that does not serve
        self._pending_info: dict[str, Any] | None = None
        self._cancel = threading.Event()
        self._busy = False  # a load thread runs (a released one may still be stopping)
        self._memory: dict[str, int] = {}
        self._timings: dict[str, float] = {}  # the last prepare: making the slice, the memory check, the load

    # ---- the CONTROL entry point (the event loop's thread, with the GIL) ----

    def __call__(self, request: str) -> tuple[str, Any]:
        try:
            req = json.loads(request)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError as e:
            return self._reply(error=f"a CONTROL request is a JSON object: {e}"), None
        op = req.get("op")
        with self._lock:
            if op == "status":
                return self._reply(), None
            if op == "prepare":
                return self._prepare(req), None
            if op == "swap":
                return self._swap()
            if op == "release":
                return self._release(), None
        return self._reply(error=f"unknown CONTROL op {op!r}: use status, prepare, swap or release"), None

    def _reply(self, error: str = "", retry: bool = False) -> str:
        d = {"ok": not error, "retry": retry, "state": self._state, "progress": round(self._progress, 4), "error": error or self._error,
             "active": self.active, "pending": self._pending_info, "host": socket.gethostname(),
             "timings_ms": self._timings, **self._memory}
        return json.dumps(d)

    def _prepare(self, req: dict) -> str:
        if self._state in ("preparing", "loading"):
            return self._reply(error="a load already runs on this stage: wait for it, or release it first")
        if self._pending is not None:
            return self._reply(error="a model is already loaded beside the one served: release it first")
        if self._busy:
            return self._reply(error="a released load is still stopping on this stage: ask again in a moment",
                               retry=True)
        model = req.get("model")
        layers = req.get("layers")
        if not isinstance(model, str) or not model or not (layers is None or isinstance(layers, str)):
            return self._reply(error="prepare needs 'model' (a name, path or URL) and 'layers' (\"A-B\", inclusive)")
        fetch = req.get("fetch") or []
        spec = dataclasses.replace(self.opts, model=model, layers=layers or None, sha256=str(req.get("sha256") or ""),
                                   model_sha256=str(req.get("model_sha256") or ""),
                                   fetch=tuple(fetch) if isinstance(fetch, list) else (str(fetch),))
        self._state, self._progress, self._error, self._memory, self._timings = "preparing", 0.0, "", {}, {}
        self._pending_info = {"model": model, "layers": layers}
        self._cancel.clear()
        self._busy = True
        threading.Thread(target=self._load, args=(spec,), daemon=True, name="nak-swap-load").start()
        return self._reply()

    def _swap(self) -> tuple[str, Any]:
        if self._state != "ready" or self._pending is None:
            return self._reply(error=f"nothing to swap to: the stage is {self._state}"), None
        nxt = self._pending
        # the event loop trades the two slices as this returns: `nxt` then holds the old one
        self.active, self._pending_info = dict(self._pending_info or {}), dict(self.active)
        if self.on_swap is not None:
            try:
                self.on_swap(self.active)
            except Exception:  # an announcement that fails must not fail the swap
                pass
        return self._reply(), nxt

    def _release(self) -> str:
        if self._state in ("preparing", "loading"):
            self._cancel.set()  # the load stops at its next progress callback; the thread frees it
            self._state = "idle"
            self._pending_info = None
            return self._reply()
        self._pending = None  # drops the llama_model and context it held
        self._pending_info = None
        self._state, self._progress, self._error = "idle", 0.0, ""
        return self._reply()

    # ---- the load, on its own thread ----

    def _load(self, spec: Any) -> None:
        """The prepare's work (its own thread): make the slice, check its memory, load it. Its
        outcome is set in one locked step that also marks the thread done, so a client that has
        seen ``failed`` or ``ready`` may prepare again at once."""
        from .. import _nakshatra
        from .options import stage_kwargs
        from .serve import slice_for

        t0 = time.perf_counter()
        st, info, error = None, None, ""
        try:
            path, model_sha = slice_for(spec, self.key, progress=False)
            t1 = time.perf_counter()
            self._check_memory(path, spec)
            t2 = time.perf_counter()
            self._timings = {"slice_ms": round((t1 - t0) * 1e3, 1), "memory_check_ms": round((t2 - t1) * 1e3, 1)}
            with self._lock:
                if not self._cancel.is_set():
                    self._state = "loading"

            def on_progress(p: float) -> bool:
                self._progress = p
                return not self._cancel.is_set()

            if not self._cancel.is_set():
                st = _nakshatra.Stage(str(path), on_progress=on_progress,
                                      **{**stage_kwargs(spec), "model_sha256": model_sha})
                info = st.info()
                info["path"] = str(path)
                self._timings["load_ms"] = round((time.perf_counter() - t2) * 1e3, 1)
        except Exception as e:  # noqa: BLE001 - any failure is this load's outcome, never a stuck "preparing"
            error = str(e) or type(e).__name__
        with self._lock:
            self._busy = False
            if self._cancel.is_set():
                return  # released meanwhile: `st`, if loaded, is freed here
            if st is None or info is None:
                self._state, self._error = "failed", error or "the load stopped"
                return
            self._pending = st
            self._pending_info = {"model": str(spec.model), "layers": spec.layers,
                                  "model_sha256": info["model_sha256"], "path": info["path"],
                                  "layer_start": info["layer_start"], "layer_end": info["layer_end"],
                                  "n_layer_full": info["n_layer_full"], "arch": info["arch"]}
            self._state, self._progress = "ready", 1.0

    def _check_memory(self, path: Path, spec: Any) -> None:
        """Refuse (NakError naming the host and the shortfall) a slice that does not fit beside the
        model served now."""
        from ..gguf.memory import predict_stage

        opts = {k: getattr(spec, k) for k in ("n_gpu_layers", "flash_attn", "cache_type_k", "cache_type_v",
                                              "no_repack", "mlock", "swa_full")}
        p = predict_stage(path, spec.ctx, spec.max_sessions, **opts)
        need = int(p["total_bytes"]) - int(p["baseline_bytes"])
        avail = available_bytes()
        with self._lock:
            self._memory = {"need_bytes": need, "available_bytes": avail}
        dev_need = int(p["device_bytes"])
        if dev_need:  # the GPU buffers of the new slice, beside the old slice's on the same GPUs
            from .. import _nakshatra

            names = [d for d in spec.devices.split(",") if d] if spec.devices not in ("", "none") else []
            gpus = [d for d in _nakshatra.build_info()["devices"] if not names or d["name"] in names]
            free = sum(int(d.get("free_bytes", 0)) for d in gpus)
            if free and dev_need > free:
                raise NakError(f"host {socket.gethostname()}: the new slice ({Path(path).name}) needs {_mib(dev_need)} of "
                               f"GPU memory beside the model it serves, {_mib(free)} is free on "
                               f"{', '.join(d['name'] for d in gpus)}: short by {_mib(dev_need - free)}. Offload fewer "
                               "layers (--n-gpu-layers), give the stage fewer layers (nak plan), or free GPU memory")
        if avail and need > avail:
            raise NakError(f"host {socket.gethostname()}: the new slice ({Path(path).name}) needs {_mib(need)} beside "
                           f"the model it serves, {_mib(avail)} is available: short by {_mib(need - avail)}. "
                           "Free memory on that host, give it fewer layers (nak plan), or swap with fewer "
                           "--max-sessions / a smaller --ctx")
