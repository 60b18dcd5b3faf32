"""``nak api``: an OpenAI-compatible HTTP server in front of a chain of stages, with a dashboard.

Endpoints (FastAPI + uvicorn):

- ``GET /v1/models``; ``POST /v1/completions``; ``POST /v1/chat/completions`` (``stream: true``
  sends server-sent events, ``data: {chunk}`` lines ending with ``data: [DONE]``, as OpenAI does).
  Fields: ``max_tokens`` (``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``,
  ``stop`` (a string or up to 4), ``stream_options.include_usage``; answers carry ``usage``
  (prompt, completion, total tokens) and ``finish_reason`` ``stop`` or ``length``. Errors have
  OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 404 ``model_not_found``,
  400 ``context_length_exceeded`` / ``invalid_request_error``, 503 when the chain is down.
- ``GET /health`` for probes (200 when every layer range answers, else 503),
  ``GET /metrics`` (Prometheus text format), ``GET /api/cluster`` (the dashboard's data),
  ``GET /`` the dashboard page.

Each request is one session on the chain. Workers (``parallel`` of them) each hold a
:class:`~nakshatra.chain.Chain` and keep their last session open after the request, with the
tokens its KV cache holds: a new request goes to the worker whose tokens share the longest prefix
with its prompt, which rolls its stages' KV back to that prefix (TRUNCATE), takes the new sampling
settings (OPEN with reuse) and feeds only the rest. OpenAI clients resend the whole conversation
every turn, so a conversation's prefill costs only its new turn (llama-server's prompt cache does
the same: ``cache_prompt``).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from .chain import Chain, FailoverError, GenerationStats, SamplerParams, Session, health_score, hung
from .errors import ChainError, NakError, StageError

WEB_DIR = Path(__file__).parent / "web"


class ApiError(Exception):
    """An error answered to the HTTP client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, text_so_far: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.text_so_far = text_so_far  # a generation cut by a dead stage: what it had produced

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


class Metrics:
    """Counters for ``/metrics`` (prometheus_client registry of its own) and the dashboard."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nak_requests", "HTTP API requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("nak_prompt_tokens", "Prompt tokens received", registry=r)
        self.reused_tokens = Counter("nak_prompt_tokens_reused", "Prompt tokens whose KV cache was reused", registry=r)
        self.completion_tokens = Counter("nak_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("nak_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.decode_tps = Gauge("nak_decode_tokens_per_second", "Decode speed of the last generation", registry=r)
        self.sessions = Gauge("nak_sessions_active", "Generations in progress", registry=r)
        self.errors = Counter("nak_stage_errors", "Errors by stage", ["stage"], registry=r)
        stage_g = {k: Gauge(f"nak_stage_{k}", d, ["stage", "layers"], registry=r) for k, d in (
            ("up", "1 when the stage answers"), ("sessions", "Sessions open on the stage"),
            ("queue_depth", "Requests waiting at the stage"), ("kv_tokens_used", "KV cells in use"),
            ("rss_bytes", "Resident memory of the stage process, bytes"),
            ("rss_anon_bytes", "Memory only the stage holds (weight copies, KV, buffers), bytes"),
            ("rss_file_bytes", "File-backed resident memory of the stage (its mmap'd slice; reclaimable), bytes"))}
        self.stage_gauges = stage_g
        self.engine = engine

    def scrape(self) -> bytes:
        from prometheus_client import generate_latest

        for s in self.engine.cluster()["stages"]:
            lab = (s["address"], s.get("layers", ""))
            h = s.get("health") or {}
            self.stage_gauges["up"].labels(*lab).set(1 if s["up"] else 0)
            if h:
                self.stage_gauges["sessions"].labels(*lab).set(h["sessions_active"])
                self.stage_gauges["queue_depth"].labels(*lab).set(h["queue_depth"])
                self.stage_gauges["kv_tokens_used"].labels(*lab).set(h["kv_tokens_used"])
                self.stage_gauges["rss_bytes"].labels(*lab).set(h["rss_bytes"])
                self.stage_gauges["rss_anon_bytes"].labels(*lab).set(h.get("rss_anon_bytes", 0))
                self.stage_gauges["rss_file_bytes"].labels(*lab).set(h.get("rss_file_bytes", 0))
        return generate_latest(self.registry)


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
                    if attempt == 1:
                        raise ApiError(503, f"the chain does not answer: {e}", "server_error",
                                       code="stage_unavailable") from None
                    try:
                        self._meta_chain.close()
                        self._meta_chain = self._new_chain()
                    except (StageError, ChainError) as e2:
                        raise ApiError(503, f"the chain does not answer: {e2}", "server_error",
                                       code="stage_unavailable") from None

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
        from . import _nakshatra
        from .chain import parse_stage_address
        from .ranges import LayerRange

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


# ---- request parsing -----------------------------------------------------------------------

def _num(body: dict, name: str, kind: type, default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise ApiError(400, f"'{name}' must be a{'n integer' if kind is int else ' number'}, got {v!r}", param=name)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ApiError(400, f"'{name}' = {v} is out of range [{lo}, {hi}]", param=name)
    return v


def _stops(body: dict) -> list[str]:
    s = body.get("stop")
    if s is None:
        return []
    if isinstance(s, str):
        return [s]
    if isinstance(s, list) and all(isinstance(x, str) for x in s) and len(s) <= 4:
        return list(s)
    raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise ApiError(400, "only text content parts are supported", param="messages")
        return "".join(out)
    if content is None:
        return ""
    raise ApiError(400, "message content must be a string or a list of text parts", param="messages")


def build_request(engine: Engine, body: dict, chat: bool) -> GenRequest:
    """Check an OpenAI request body and turn it into a GenRequest; raises ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model != engine.model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{engine.model_id}' "
                            "(GET /v1/models)", param="model", code="model_not_found")
    if _num(body, "n", int, 1, 1, 1) != 1:
        raise ApiError(400, "only n = 1 is supported", param="n")
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        turns = []
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
                raise ApiError(400, "each message needs a role (system, user, assistant) and content", param="messages")
            role = "system" if m["role"] == "developer" else m["role"]
            turns.append((role, _content_text(m.get("content"))))
        text = engine.chat_prompt(turns)
        tokens = engine.tokenize(text, special=True)
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, list) and p and all(isinstance(t, int) for t in p):
            tokens = list(p)
        elif isinstance(p, str) and p:
            tokens = engine.tokenize(p, special=False)
        else:
            raise ApiError(400, "'prompt' must be a non-empty string (or a list of token ids)", param="prompt")
    if not tokens:
        raise ApiError(400, "the prompt is empty", param="prompt")
    room = engine.n_ctx - len(tokens)
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {engine.n_ctx} tokens; the prompt has "
                            f"{len(tokens)}. Shorten it, or start the stages with a larger --ctx.",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    default_max = room if chat else 16  # OpenAI's defaults: chat until the end, completions 16
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = default_max if max_tokens is None else _num({"max_tokens": max_tokens}, "max_tokens", int, 16, 1)
    if len(tokens) + max_tokens > engine.n_ctx:
        raise ApiError(400, f"This model's maximum context length is {engine.n_ctx} tokens. However, you requested "
                            f"{len(tokens) + max_tokens} tokens ({len(tokens)} in the prompt, {max_tokens} for the "
                            f"completion). Reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    temp = _num(body, "temperature", float, 1.0, 0.0, 2.0)
    top_p = _num(body, "top_p", float, 1.0, 0.0, 1.0)
    seed = body.get("seed")
    if seed is not None:
        seed = _num(body, "seed", int, None) % (2**32 - 1)
    # llama-server's extra sampling fields are taken too; OpenAI's own leave top-k and min-p off
    sampler = SamplerParams(temp=temp, top_k=_num(body, "top_k", int, 0, 0), top_p=top_p,
                            min_p=_num(body, "min_p", float, 0.0, 0.0, 1.0),
                            repeat_penalty=_num(body, "repeat_penalty", float, 1.0, 0.01, 10.0),
                            repeat_last_n=_num(body, "repeat_last_n", int, 64, 0), seed=seed)
    return GenRequest(tokens, max_tokens, sampler, _stops(body))


# ---- the app ---------------------------------------------------------------------------------

def create_app(engine: Engine):
    """The FastAPI application serving ``engine`` (see the module docstring for the endpoints)."""
    app = FastAPI(title="Nakshatra", description="OpenAI-compatible API over a chain of llama.cpp stages")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        engine.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    async def _body(request: Request) -> dict:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None

    @app.get("/health")
    def health():
        c = engine.cluster()
        ranges_up = {(s["layer_start"], s["layer_end"]) for s in c["stages"] if s["up"]}
        up = sum(1 for s in c["stages"] if s["up"])
        covered = _covers(ranges_up, engine.n_layer)
        return JSONResponse({"status": "ok" if covered else "degraded", "stages_up": up,
                             "stages": len(c["stages"]), "model": engine.model_id},
                            status_code=200 if covered else 503)

    @app.get("/metrics")
    def metrics():
        return Response(engine.metrics.scrape(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/cluster")
    def cluster():
        return engine.cluster()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": engine.created,
                                            "owned_by": "nakshatra", "meta": {"n_ctx": engine.n_ctx,
                                                                              "sha256": engine.model_sha256}}]}

    @app.get("/v1/models/{model_id}")
    def model(model_id: str):
        if model_id != engine.model_id:
            raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "nakshatra"}

    @app.get("/")
    def index():
        page = WEB_DIR / "index.html"
        if not page.is_file():
            return JSONResponse({"message": "Nakshatra API; see /v1/models"}, status_code=200)
        return FileResponse(page, media_type="text/html")

    async def _complete(request: Request, chat: bool):
        body = await _body(request)
        req = build_request(engine, body, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        path = request.url.path
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(engine, req, rid, created, chat, include_usage, request),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        res = await asyncio.to_thread(engine.generate, req)
        engine.metrics.requests.labels(path, "200").inc()
        usage = _usage(res)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                      "logprobs": None, "finish_reason": res.finish_reason}
        else:
            choice = {"index": 0, "text": res.text, "logprobs": None, "finish_reason": res.finish_reason}
        return {"id": rid, "object": obj, "created": created, "model": engine.model_id,
                "choices": [choice], "usage": usage, "system_fingerprint": f"nak-{engine.model_sha256[:12]}"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, False)

    return app


def _covers(ranges: set[tuple[int, int]], n_layer: int) -> bool:
    reach = 0
    for a, b in sorted(ranges):
        if a <= reach:
            reach = max(reach, b)
    return reach >= n_layer


def _usage(res: GenResult) -> dict:
    return {"prompt_tokens": res.n_prompt, "completion_tokens": res.n_completion,
            "total_tokens": res.n_prompt + res.n_completion,
            "prompt_tokens_details": {"cached_tokens": res.n_reused}}


async def _stream(engine: Engine, req: GenRequest, rid: str, created: int, chat: bool, include_usage: bool,
                  request) -> Iterator[str]:
    """Server-sent events of one generation: a role chunk (chat), text chunks, a final chunk
    with finish_reason, a usage chunk when asked, then ``[DONE]``. A client that goes away
    stops the generation (its worker is freed at the next token)."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: dict | None, text: str | None, finish: str | None, usage: dict | None = None) -> str:
        if chat:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        else:
            choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
        d = {"id": rid, "object": obj, "created": created, "model": engine.model_id, "choices": choices}
        if usage is not None:
            d["usage"] = usage
        return f"data: {json.dumps(d)}\n\n"

    def work() -> None:
        try:
            res = engine.generate(req, on_text=lambda t: loop.call_soon_threadsafe(q.put_nowait, ("text", t)),
                                  cancelled=gone.is_set)
            loop.call_soon_threadsafe(q.put_nowait, ("done", res))
        except ApiError as e:
            loop.call_soon_threadsafe(q.put_nowait, ("error", e))
        except Exception as e:  # noqa: BLE001 - reported to the client, not lost
            loop.call_soon_threadsafe(q.put_nowait, ("error", ApiError(500, f"internal error: {e}", "server_error")))

    threading.Thread(target=work, daemon=True, name="nak-api-gen").start()
    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""}, None, None)
        while True:
            kind, val = await q.get()
            if kind == "text":
                yield chunk({"content": val}, val, None)
            elif kind == "done":
                yield chunk({}, "", val.finish_reason)
                if include_usage:
                    yield chunk(None, None, None, _usage(val))
                engine.metrics.requests.labels(request.url.path, "200").inc()
                break
            else:
                engine.metrics.requests.labels(request.url.path, str(val.status)).inc()
                yield f"data: {json.dumps(val.body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        gone.set()


def serve_api(engine: Engine, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning",
              ready: Callable[[str], None] | None = None) -> None:
    """Run the HTTP server (uvicorn) until interrupted; ``ready(url)`` is called once it listens."""
    import uvicorn

    config = uvicorn.Config(create_app(engine), host=host, port=port, log_level=log_level, access_log=False)
    server = uvicorn.Server(config)
    if ready is not None:
        orig = server.startup

        async def startup(sockets=None):
            await orig(sockets=sockets)
            if server.started:
                for s in server.servers:
                    for sock in s.sockets:
                        h, p = sock.getsockname()[:2]
                        ready(f"http://{h}:{p}")
                        return

        server.startup = startup  # type: ignore[method-assign]
    server.run()
