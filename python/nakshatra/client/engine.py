"""What ``nak api`` runs generations with: a pool of workers, each a :class:`~nakshatra.client.chain.Chain`
with the session it keeps open between requests (the prompt cache: a new request goes to the worker
whose tokens share the longest prefix with its prompt, see :mod:`.api`), stop strings held back
until they can no longer match, and :class:`ApiError`, the error the HTTP layer answers in OpenAI's shape.
"""

from __future__ import annotations

import codecs
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ChainError, NakError, StageError
from .chain import Chain, FailoverError, GenerationStats, SamplerParams, Session, health_score, hung
from .metrics import Metrics


class ApiError(Exception):
    """An error answered to the HTTP client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, text_so_far: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.text_so_far = text_so_far  # a generation cut by a dead stage or a swap: what it had produced
        self.retry_after_s = retry_after_s  # sent as the Retry-After header (a 503 during a model swap)

    def body(self) -> dict:
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.text_so_far is not None:
            err["text_so_far"] = self.text_so_far
        return {"error": err}


@dataclass
class GenRequest:
    """One generation: the prompt's tokens, how many to make, the sampler and the stop strings."""

    prompt_tokens: list[int]
    max_tokens: int
    sampler: SamplerParams
    stop: list[str] = field(default_factory=list)


@dataclass
class GenResult:
    """What a generation produced: text, token counts, why it ended, and its timings (ms)."""

    text: str = ""
    n_prompt: int = 0
    n_completion: int = 0
    n_reused: int = 0  # prompt tokens whose KV came from the worker's previous session
    finish_reason: str = "length"
    ttft_ms: float = 0.0
    decode_ms: float = 0.0


@dataclass
class Worker:
    """A chain connection set and the session it keeps open between requests (prompt cache)."""

    chain: Chain
    session: Session | None = None
    busy: bool = False
    last_used: float = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.session.tokens if self.session is not None else []


def _decode_counters(chain: Chain, session_id: int) -> list[tuple[int, int]]:
    """Each stage's (decode_us, decode_steps) so far for one session (its STATS counters)."""
    out = []
    for c in chain.clients:
        s = json.loads(c.stats()).get("sessions", {}).get(str(session_id), {})
        out.append((int(s.get("decode_us", 0)), int(s.get("decode_steps", 0))))
    return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class StopMatcher:
    """Cuts streamed text at the first stop string. ``feed`` returns the text safe to send now
    (text that could still begin a stop string is held back) and whether a stop string was hit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf, False
        hits = [buf.find(s) for s in self.stops if s in buf]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:  # the longest tail of buf that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Engine:
    """Runs generations on a chain for the HTTP layer: a pool of ``parallel`` workers (each its
    own Chain and cached session), the model's tokenizer and chat template, live figures.

    ``addresses``: the stages (``host:port``, replicas allowed); ``model_id``: the name
    ``/v1/models`` lists and requests must use. Raises ChainError when the chain cannot be built.
    """

    def __init__(self, addresses: Sequence[str], model_id: str, parallel: int = 4, key: bytes | None = None,
                 timeout_s: float = 60.0, forwarding: bool = True, draft_max: int = 0) -> None:
        if parallel < 1:
            raise NakError(f"--parallel {parallel} must be >= 1")
        self.addresses = list(addresses)
        self.model_id = model_id
        self.available: list[str] = []  # other models the cluster file names (not loaded)
        self.parallel = parallel
        self.key = key
        self.timeout_s = timeout_s
        self.forwarding = forwarding
        self.draft_max = draft_max  # speculative decoding per session (Chain's draft_max; 0: off)
        self.created = int(time.time())
        self._meta_chain = self._new_chain()  # tokenizer, template, detokenizer: no session
        self._meta_lock = threading.Lock()
        self.n_ctx = min(s.health["n_ctx_session"] for s in self._meta_chain.stages)
        self.model_sha256 = self._meta_chain.stages[0].model_sha256
        self.arch = self._meta_chain.stages[0].arch
        self.n_layer = self._meta_chain.stages[0].n_layer_full
        self.workers: list[Worker] = []
        self._cv = threading.Condition()
        self.active = 0
        self.recent: deque[dict] = deque(maxlen=32)  # last generations' figures (dashboard)
        self._token_times: deque[float] = deque(maxlen=65536)  # monotonic time of every token made lately
        self.metrics = Metrics(self)
        self._cluster_cache: tuple[float, list[dict]] | None = None
        # model swaps (load_model): the stages' prepare request per model, address by address
        self.models: dict[str, list[tuple[str, dict]]] = {}
        self.auto_swap = False     # a request naming an available model loads it (as Ollama does)
        self.swap_wait_s = 30.0    # a request arriving during a swap waits this long, then gets 503
        self.drain_s = 60.0        # a swap waits this long for running generations, then ends them
        self.load_timeout_s = 600.0
        self.admitted = 0          # requests admitted (admit/leave): they run on the loaded model
        self.swap_status: dict[str, Any] | None = None  # the last swap, for the dashboard
        self._swapping: str | None = None  # the model a running swap loads
        self._cut = threading.Event()     # set when a swap's drain bound passed: generations end now
        self._swap_error: ApiError | None = None

    def model_states(self) -> list[tuple[str, str]]:
        """(name, state) of every model: the loaded one first ("loaded"), then the others the
        cluster file names ("available", or "loading" while a swap loads it)."""
        return [(self.model_id, "loaded"), *((n, "loading" if n == self._swapping else "available")
                                             for n in self.available if n != self.model_id)]

    # ---- admission and model swaps ----

    def admit(self, model: Any) -> None:
        """Let a request for ``model`` in: it then runs on the loaded model until :meth:`leave`.
        During a swap it waits up to ``swap_wait_s`` (then ApiError 503 with Retry-After). A request
        naming an available model that is not loaded loads it first with ``auto_swap`` (else
        ApiError 409 ``model_not_loaded``)."""
        deadline = time.monotonic() + self.swap_wait_s
        while True:
            with self._cv:
                while self._swapping is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ApiError(503, f"the cluster is switching to model '{self._swapping}'; retry in a few "
                                       "seconds", "server_error", code="model_loading",
                                       retry_after_s=max(1, int(self.swap_wait_s)))
                    self._cv.wait(left)
                if model == self.model_id or not isinstance(model, str) or model not in self.available:
                    self.admitted += 1
                    return
            if not self.auto_swap:
                raise ApiError(409, f"the model '{model}' is available but not loaded (this server serves "
                               f"'{self.model_id}'): POST /api/models/{model}/load, or start nak api with "
                               "--auto-swap to load a model a request names", param="model", code="model_not_loaded")
            self.load_model(model)

    def leave(self) -> None:
        """The end of a request :meth:`admit` let in."""
        with self._cv:
            self.admitted -= 1
            self._cv.notify_all()

    def load_model(self, name: str) -> dict[str, Any]:
        """Move every stage to model ``name`` in place (:func:`nakshatra.client.swap.swap_stages`):
        new requests wait (:meth:`admit`), the stages load the new slices beside the old ones while
        running generations go on, then those are waited for up to ``drain_s`` (then ended with
        ApiError 503 ``model_swapped`` and their text so far), and the stages switch. Returns the
        swap's report (:class:`~nakshatra.client.swap.SwapReport` as a dict; empty when ``name`` is
        loaded already). Raises ApiError: 404 for a model the cluster does not list, 409 while a
        swap to another model runs, 502 ``swap_failed`` naming the stage and why (every stage then
        serves the old model)."""
        from .swap import SwapError, swap_stages

        with self._cv:
            if self._swapping == name:  # the same swap, asked for again: wait for its outcome
                while self._swapping == name:
                    self._cv.wait()
                if self._swap_error is not None and self.model_id != name:
                    raise self._swap_error
                return dict(self.swap_status or {})
            if self._swapping is not None:
                raise ApiError(409, f"a swap to '{self._swapping}' is running; try again when it ends",
                               code="swap_in_progress", retry_after_s=5)
            if name == self.model_id:
                return {}
            targets = self.models.get(name)
            if targets is None:
                raise ApiError(404, f"The model '{name}' does not exist here; the cluster's models: "
                               f"{', '.join(n for n, _ in self.model_states())}", param="model",
                               code="model_not_found")
            self._swapping, self._swap_error = name, None
            old = self.model_id
        self.swap_status = {"from": old, "to": name, "state": "loading", "error": "", "stages": []}
        drained = False

        def on_update(stages) -> None:
            self.swap_status = {**(self.swap_status or {}), "stages": [
                {"address": s.address, "layers": s.spec.get("layers"), "state": s.state,
                 "progress": s.progress, "error": s.error} for s in stages]}

        def before_swap() -> None:
            nonlocal drained
            self.swap_status = {**(self.swap_status or {}), "state": "draining"}
            self._drain()
            drained = True
            self.swap_status = {**(self.swap_status or {}), "state": "switching"}

        try:
            try:
                report = swap_stages(targets, self.key, load_timeout_s=self.load_timeout_s,
                                     timeout_s=self.timeout_s, on_update=on_update, before_swap=before_swap)
            except BaseException as e:
                if drained:  # the stages are back on the old model: so is the tokenizer chain
                    self._reconnect(None)
                if not isinstance(e, SwapError):
                    raise
                err = ApiError(502, f"the swap to '{name}' failed: {e}", "server_error", code="swap_failed")
                self.swap_status = {**(self.swap_status or {}), "state": "failed", "error": str(e)}
                with self._cv:
                    self._swap_error = err
                raise err from None
            try:
                self._reconnect(name)
            except ApiError as e:
                self.swap_status = {**(self.swap_status or {}), "state": "failed", "error": e.message}
                raise
            with self._cv:
                self.available = [n for n in [old, *self.available] if n != self.model_id]
            self.swap_status = {**(self.swap_status or {}), "state": "done", "report": report.as_dict()}
            return dict(self.swap_status)
        finally:
            self._end_swap()

    def _end_swap(self) -> None:
        with self._cv:
            self._swapping = None
            self._cut.clear()
            self._cv.notify_all()

    def _drain(self) -> None:
        """Wait for the admitted requests (``drain_s``, then end them at their next token), then
        close every worker's session and chain and the tokenizer chain: the stages are about to
        switch models. Raises NakError when requests still run after the bound."""
        deadline = time.monotonic() + self.drain_s
        with self._cv:
            while self.admitted > 0 and time.monotonic() < deadline:
                self._cv.wait(max(0.01, deadline - time.monotonic()))
            if self.admitted > 0:
                self._cut.set()
                end = time.monotonic() + max(self.timeout_s, 10.0)
                while self.admitted > 0 and time.monotonic() < end:
                    self._cv.wait(max(0.01, end - time.monotonic()))
                if self.admitted > 0:
                    raise NakError(f"{self.admitted} request(s) still run {self.drain_s:.0f} s after the swap asked "
                                   "them to end")
            for w in self.workers:
                try:
                    if w.session is not None:
                        w.session.close()
                    w.chain.close()
                except Exception:  # noqa: BLE001 - a broken chain is closed anyway
                    pass
            self.workers.clear()
        with self._meta_lock:
            self._meta_chain.close()

    def _reconnect(self, name: str | None) -> None:
        """A new tokenizer chain to the stages, and the model's figures from their HELLOs: after
        a swap to model ``name``, or one rolled back (None). Raises ApiError 503 when the chain
        cannot be built."""
        with self._meta_lock:
            self._renew_meta()
            st = self._meta_chain.stages
        with self._cv:
            if name is not None:
                self.model_id = name
            self.model_sha256, self.arch, self.n_layer = st[0].model_sha256, st[0].arch, st[0].n_layer_full
            self.n_ctx = min(s.health["n_ctx_session"] for s in st)
        self._cluster_cache = None

    def _new_chain(self) -> Chain:
        return Chain(self.addresses, timeout_s=self.timeout_s, forwarding=self.forwarding, key=self.key,
                     draft_max=self.draft_max)

    def close(self) -> None:
        with self._cv:
            for w in self.workers:
                if w.session is not None:
                    w.session.close()
                w.chain.close()
            self.workers.clear()
        self._meta_chain.close()

    # ---- the model's text side, through the first stage ----

    def _on_meta(self, fn: Callable[[Chain], Any]) -> Any:
        """``fn(chain)`` on the tokenizer chain, reconnected once if its first stage went away (a
        restart, a failover); raises ApiError 503 when no chain can be built."""
        with self._meta_lock:
            for attempt in (0, 1):
                try:
                    return fn(self._meta_chain)
                except (StageError, ChainError) as e:
                    if isinstance(e, StageError) and e.code == "bad_request":  # refused: no chat template, ...
                        raise ApiError(400, str(e).replace("; run without --chat", ": use /v1/completions"),
                                       code="unsupported") from None
                    if attempt == 1:
                        raise ApiError(503, f"the chain does not answer: {e}", "server_error",
                                       code="stage_unavailable") from None
                    self._renew_meta()

    def _renew_meta(self) -> None:
        """A new tokenizer chain (``_meta_lock`` held); raises ApiError 503 when none can be built."""
        try:
            self._meta_chain.close()
            self._meta_chain = self._new_chain()
        except (StageError, ChainError) as e:
            raise ApiError(503, f"the chain does not answer: {e}", "server_error", code="stage_unavailable") from None

    def tokenize(self, text: str, special: bool) -> list[int]:
        """Token ids by the model's vocabulary (on the first stage); raises ApiError 503."""
        return self._on_meta(lambda c: c.tokenize(text, add_special=True, parse_special=special))

    def chat_prompt(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt for the messages by the model's chat template (llama.cpp's
        ``llama_chat_apply_template`` on the first stage), ending with the assistant's turn."""
        return self._on_meta(lambda c: c.apply_chat_template(messages))

    # ---- workers ----

    def _acquire(self, prompt: Sequence[int]) -> Worker:
        """The idle worker whose cached tokens share the longest prefix with ``prompt``, a new one
        while fewer than ``parallel`` exist, else wait for one to come free."""
        with self._cv:
            while True:
                idle = [w for w in self.workers if not w.busy]
                if idle:
                    best = max(idle, key=lambda w: (common_prefix(w.tokens, prompt), -w.last_used))
                    if common_prefix(best.tokens, prompt) > 0 or len(self.workers) >= self.parallel:
                        best.busy = True
                        return best
                if len(self.workers) < self.parallel:
                    w = Worker(chain=None, busy=True)  # type: ignore[arg-type]
                    self.workers.append(w)
                    break
                self._cv.wait()
        try:
            w.chain = self._new_chain()
        except Exception:
            with self._cv:
                self.workers.remove(w)
                self._cv.notify_all()
            raise
        return w

    def _release(self, w: Worker, broken: bool) -> None:
        with self._cv:
            if broken:
                if w.session is not None:
                    try:
                        w.session.close()
                    except Exception:
                        pass
                w.session = None
                try:
                    w.chain.close()
                except Exception:
                    pass
                self.workers.remove(w)
            else:
                w.busy = False
                w.last_used = time.monotonic()
            self._cv.notify_all()

    def _session_for(self, w: Worker, req: GenRequest) -> int:
        """Make ``w``'s session ready for ``req``; returns how many prompt tokens it already holds."""
        keep = min(common_prefix(w.tokens, req.prompt_tokens), len(req.prompt_tokens) - 1)
        if w.session is not None:
            try:
                w.session.truncate(keep)
                w.session.reconfigure(req.sampler, n_predict=req.max_tokens)
                return keep
            except StageError:  # expired on a stage (idle timeout) or gone: start afresh
                try:
                    w.session.close()
                except Exception:
                    pass
                w.session = None
        w.session = w.chain.session(req.sampler, n_predict=req.max_tokens)
        return 0

    def generate(self, req: GenRequest, on_text: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] = lambda: False) -> GenResult:
        """Run one generation (blocking); ``on_text`` receives the text as it comes, cut at the
        first stop string. Raises ApiError (503) when the chain breaks beyond its replicas."""
        res = GenResult(n_prompt=len(req.prompt_tokens))
        parts: list[str] = []
        try:
            w = self._acquire(req.prompt_tokens)
        except (StageError, ChainError) as e:
            raise ApiError(503, f"the chain does not answer: {e}", "server_error", code="stage_unavailable") from None
        broken = False
        with self._cv:
            self.active += 1
        self.metrics.sessions.inc()
        try:
            sess_keep = self._session_for(w, req)
            sess = w.session
            assert sess is not None
            res.n_reused = sess_keep
            compute0 = _decode_counters(w.chain, sess.id)
            matcher = StopMatcher(req.stop)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            st = GenerationStats()
            t0 = time.perf_counter()
            hit = False
            for _, piece in w.chain.generate_tokens(req.prompt_tokens[sess_keep:], req.max_tokens,
                                                    session=sess, stats=st):
                res.n_completion += 1
                self._token_times.append(time.monotonic())
                if res.n_completion == 1:
                    res.ttft_ms = (time.perf_counter() - t0) * 1e3
                text, hit = matcher.feed(decoder.decode(piece))
                if text:
                    parts.append(text)
                    if on_text:
                        on_text(text)
                if hit or cancelled():
                    break
                if self._cut.is_set():
                    broken = True  # its session is closed by the swap anyway
                    raise ApiError(503, f"the generation was ended early: the cluster is switching to model "
                                   f"'{self._swapping}'", "server_error", code="model_swapped",
                                   text_so_far="".join(parts), retry_after_s=max(1, int(self.swap_wait_s)))
            if hit:
                res.finish_reason = "stop"
            else:
                tail, hit = matcher.feed(decoder.decode(b"", final=True))
                tail += "" if hit else matcher.flush()
                if tail:
                    parts.append(tail)
                    if on_text:
                        on_text(tail)
                res.finish_reason = "stop" if hit or res.n_completion < req.max_tokens else "length"
            res.text = "".join(parts)
            res.decode_ms = st.decode_ms
            n = len(w.chain.stages)
            compute1 = _decode_counters(w.chain, sess.id)
            # per decode step, from each stage's own counters (STATS): compute of one token there, ms
            stage_ms = [(b[0] - a[0]) / 1e3 / (b[1] - a[1]) if b[1] > a[1] else 0.0
                        for a, b in zip(compute0, compute1)]
            fig = {"t": time.time(), "n_prompt": res.n_prompt, "n_reused": res.n_reused,
                   "n_completion": res.n_completion, "ttft_ms": res.ttft_ms,
                   "decode_tps": st.decode_tps, "stage_compute_ms": stage_ms}
            if st.decode_tps > 0 and all(stage_ms):
                per_token_ms = 1e3 / st.decode_tps
                # what a token costs beyond the stages' compute, per network leg: forwarding has the
                # client's leg to the first stage, n-1 stage-to-stage legs and the reply; relay 2n
                legs = n + 1 if w.chain.forwarding else 2 * n
                fig["hop_ms"] = max(0.0, per_token_ms - sum(stage_ms)) / legs
            self.recent.append(fig)
            self.metrics.prompt_tokens.inc(res.n_prompt)
            self.metrics.reused_tokens.inc(res.n_reused)
            self.metrics.completion_tokens.inc(res.n_completion)
            self.metrics.ttft.observe(res.ttft_ms / 1e3)
            if st.decode_tps > 0:
                self.metrics.decode_tps.set(st.decode_tps)
            return res
        except FailoverError as e:
            broken = True
            self.metrics.errors.labels(e.stage).inc()
            raise ApiError(503, f"the chain broke: {e}", "server_error", code="stage_unavailable",
                           text_so_far="".join(parts)) from None
        except (StageError, ChainError) as e:
            broken = True
            self.metrics.errors.labels("chain").inc()
            raise ApiError(503, f"the chain failed: {e}", "server_error", code="stage_unavailable",
                           text_so_far="".join(parts)) from None
        finally:
            self.metrics.sessions.dec()
            with self._cv:
                self.active -= 1
            self._release(w, broken)

    # ---- the dashboard's view ----

    def cluster(self, max_age_s: float = 1.0) -> dict:
        """What ``/api/cluster`` returns: every stage's health and role (one HELLO each, cached
        ``max_age_s`` seconds), and this server's own figures, always current: active sessions,
        the last finished generation's decode tok/s, time to first token (ms; None before the
        first generation), per-hop and per-stage ms, and the live tok/s over the last 2 s."""
        now = time.monotonic()
        rows = self._stage_rows(now, max_age_s)
        recent = list(self.recent)
        last = recent[-1] if recent else {}
        window_s = 2.0
        live = sum(1 for t in list(self._token_times) if t > now - window_s) / window_s
        return {"model": self.model_id, "model_sha256": self.model_sha256, "arch": self.arch,
                "n_layer": self.n_layer, "n_ctx": self.n_ctx, "stages": rows, "sessions_active": self.active,
                "parallel": self.parallel, "decode_tps": last.get("decode_tps", 0.0),
                "ttft_ms": last.get("ttft_ms"),
                "live_tps": live,  # tokens of every session over the last 2 s, per second
                "hop_ms": last.get("hop_ms"), "stage_compute_ms": last.get("stage_compute_ms", []),
                "history": [{"t": f["t"], "decode_tps": f["decode_tps"]} for f in recent]}

    def _stage_rows(self, now: float, max_age_s: float) -> list[dict]:
        """One row per stage address (health, role serving/replica/down), cached ``max_age_s``
        seconds: the HELLOs are the expensive part of a dashboard poll. Only the rows are cached,
        so a poll right after a generation ends still shows that generation's figures."""
        if self._cluster_cache and now - self._cluster_cache[0] < max_age_s:
            return self._cluster_cache[1]
        from .. import _nakshatra
        from ..ranges import LayerRange
        from .chain import parse_stage_address

        rows = []
        for a in self.addresses:
            host, port = parse_stage_address(a)
            row: dict[str, Any] = {"address": f"{host}:{port}", "up": False}
            try:
                c = _nakshatra.StageClient(host, port, timeout_ms=2000, connect_timeout_ms=1000, key=self.key or b"")
                try:
                    h = c.hello(client_name="nak-api")
                finally:
                    c.close()
                rng = LayerRange(h["layer_start"], h["layer_end"])
                if hung(h["health"], self.timeout_s):
                    raise StageError(f"its computation has made no progress for {h['health']['stalled_ms'] / 1e3:.1f} s "
                                     "(hung)", "timeout")
                row.update(up=True, host=host, layers=rng.inclusive(), layer_start=rng.start, layer_end=rng.end,
                           n_layers=rng.n_layers, health=h["health"], score=health_score(h["health"]),
                           backend=h["backend"])
            except StageError as e:
                row["error"] = str(e)
            rows.append(row)
        best: dict[tuple[int, int], str] = {}
        for r in sorted((r for r in rows if r["up"]), key=lambda r: (r["score"], r["address"])):
            best.setdefault((r["layer_start"], r["layer_end"]), r["address"])
        for r in rows:
            r["role"] = ("serving" if best.get((r.get("layer_start"), r.get("layer_end"))) == r["address"]
                         else "replica") if r["up"] else "down"
        rows.sort(key=lambda r: (r.get("layer_start", 1 << 30), r["address"]))
        self._cluster_cache = (now, rows)
        return rows
