"""OpenAI request bodies checked and turned into a :class:`~nakshatra.client.engine.GenRequest`
(``/v1/completions``, ``/v1/chat/completions``), and the ``usage`` object answers carry. Field
names, limits and error shapes follow OpenAI's API reference; a bad field gets a 400
:class:`~nakshatra.client.engine.ApiError` that names it (``param``).
"""

from __future__ import annotations

from typing import Any

from .chain import SamplerParams
from .engine import ApiError, Engine, GenRequest, GenResult


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


def _usage(res: GenResult) -> dict:
    return {"prompt_tokens": res.n_prompt, "completion_tokens": res.n_completion,
            "total_tokens": res.n_prompt + res.n_completion,
            "prompt_tokens_details": {"cached_tokens": res.n_reused}}
