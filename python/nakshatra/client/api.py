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
:class:`~nakshatra.client.chain.Chain` and keep their last session open after the request, with the
tokens its KV cache holds: a new request goes to the worker whose tokens share the longest prefix
with its prompt, which rolls its stages' KV back to that prefix (TRUNCATE), takes the new sampling
settings (OPEN with reuse) and feeds only the rest. OpenAI clients resend the whole conversation
every turn, so a conversation's prefill costs only its new turn (llama-server's prompt cache does
the same: ``cache_prompt``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from .engine import ApiError, Engine, GenRequest
from .openai import _usage, build_request

WEB_DIR = Path(__file__).parent / "web"


def create_app(engine: Engine):
    """The FastAPI application serving ``engine`` (see the module docstring for the endpoints)."""
    app = FastAPI(title="Nakshatra", description="OpenAI-compatible API over a chain of llama.cpp stages")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        engine.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

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
        return {**engine.cluster(), "models": _models_view()}

    def _models_view() -> dict:
        return {"loaded": engine.model_id, "auto_swap": engine.auto_swap,
                "models": [{"id": n, "state": st, "swappable": st == "loaded" or n in engine.models}
                           for n, st in engine.model_states()],
                "swap": engine.swap_status}

    @app.get("/api/models")
    def api_models():
        return _models_view()

    @app.post("/api/models/{name}/load")
    async def load_model(name: str):
        report = await asyncio.to_thread(engine.load_model, name)
        engine.metrics.requests.labels("/api/models/load", "200").inc()
        return {"model": engine.model_id, "state": "loaded", "swap": report}

    def _model_entry(name: str, state: str) -> dict:
        e = {"id": name, "object": "model", "created": engine.created, "owned_by": "nakshatra", "state": state}
        if state == "loaded":
            e["meta"] = {"n_ctx": engine.n_ctx, "sha256": engine.model_sha256}
        return e

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [_model_entry(n, st) for n, st in engine.model_states()]}

    @app.get("/v1/models/{model_id}")
    def model(model_id: str):
        for n, st in engine.model_states():
            if n == model_id:
                return _model_entry(n, st)
        raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    @app.get("/")
    def index():
        page = WEB_DIR / "index.html"
        if not page.is_file():
            return JSONResponse({"message": "Nakshatra API; see /v1/models"}, status_code=200)
        return FileResponse(page, media_type="text/html")

    async def _complete(request: Request, chat: bool):
        body = await _body(request)
        # admitted requests run on the loaded model: a swap waits for them, and they for a swap
        await asyncio.to_thread(engine.admit, body.get("model") if isinstance(body, dict) else None)
        try:
            req = build_request(engine, body, chat)
        except BaseException:
            engine.leave()
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        path = request.url.path
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(engine, req, rid, created, chat, include_usage, request, engine.leave),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        def run():
            try:
                return engine.generate(req)
            finally:
                engine.leave()  # here, not in the handler: a client that goes away leaves it running

        res = await asyncio.to_thread(run)
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


def _stream(engine: Engine, req: GenRequest, rid: str, created: int, chat: bool, include_usage: bool,
            request, done: Callable[[], None]) -> AsyncIterator[str]:
    """Server-sent events of one generation: a role chunk (chat), text chunks, a final chunk
    with finish_reason, a usage chunk when asked, then ``[DONE]``. A client that goes away
    stops the generation (its worker is freed at the next token). ``done()`` is called once
    the generation has ended, whatever the outcome (the request's admission ends)."""
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
        finally:
            done()

    # started now, not when the response body is first read: `done` must run even if it never is
    threading.Thread(target=work, daemon=True, name="nak-api-gen").start()
    return _events(q, gone, chunk, chat, include_usage, engine, request)


async def _events(q: asyncio.Queue, gone: threading.Event, chunk: Callable, chat: bool, include_usage: bool,
                  engine: Engine, request) -> AsyncIterator[str]:
    """The server-sent events of a generation running on its thread (see _stream)."""
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
