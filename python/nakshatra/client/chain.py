"""The client side of a chain of stages: validate the chain, open sessions, run prefill and
decode through every stage, sample on the last one, and stream text back.

How a token flows, client-relayed: the client sends token ids to the first stage, which embeds
them, runs its layers and returns the hidden state ``[n_tokens, n_embd] float32``; the client hands
that state to the next stage, and so on; the last stage runs its layers, the output norm and the LM
head, samples one token with llama.cpp's samplers and returns it with its text piece. With
forwarding (``Chain(forwarding=True)``) each stage sends its hidden state straight to the next and
only the last answers the client; in a ring (``ring=True``) the last stage also hands each sampled
token to the first, so the client only receives (see docs/architecture.md).
"""

from __future__ import annotations

import codecs
import random
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import _nakshatra
from ..errors import ChainError, StageError
from ..ranges import LayerRange

DEFAULT_N_BATCH = 2048  # llama.cpp's default n_batch: prompts are cut into chunks of this size
# A forwarding chain feeds a prompt in micro-batches of this many tokens, pipelined through the
# stages (Session._prefill). 512 is a stage's n_ubatch (llama.cpp's default): the micro-batches
# are the very ubatches llama.cpp cuts one n_batch chunk into, so pipelining changes no bit of the
# output. Smaller ones, with short first and last ones (prefill_ramp), fill and drain the pipeline
# sooner but cut other ubatches, and llama.cpp's kernels are not batch-invariant.
DEFAULT_PREFILL_CHUNK = 512
PREFILL_RAMP = 4  # with prefill_ramp, the first and last micro-batches are prefill_chunk / this


def parse_stage_address(text: str) -> tuple[str, int]:
    """Parse ``host:port`` (``[v6addr]:port`` for IPv6) into ``(host, port)``.

    Raises ChainError naming the bad entry.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ChainError(f"stage address {text!r} is not host:port (e.g. 127.0.0.1:7071)")
    return host.strip("[]"), int(port)


def _sampler_default(name: str) -> Any:
    """The C++ default of a sampler setting; a float32 there, given back as the decimal it was
    written as (0.8, not 0.800000011920929), which is the same float32 again on the wire."""
    v = getattr(_nakshatra.SamplerParams(), name)
    return float(f"{v:.7g}") if isinstance(v, float) else v


@dataclass
class SamplerParams:
    """llama.cpp sampler settings, applied on the last stage in llama.cpp's default order
    (penalties, top-k, top-p, min-p, temperature, dist). ``temp <= 0`` is greedy. ``seed=None``
    draws a random seed. The defaults are the stage's (``_nakshatra.SamplerParams()``,
    cpp/protocol/protocol.h: nak_sampler_params); ``nak run``'s options take theirs from here."""

    temp: float = _sampler_default("temp")
    top_k: int = _sampler_default("top_k")
    top_p: float = _sampler_default("top_p")
    min_p: float = _sampler_default("min_p")
    repeat_penalty: float = _sampler_default("repeat_penalty")
    repeat_last_n: int = _sampler_default("repeat_last_n")
    seed: int | None = None

    def check(self) -> None:
        """Raise ChainError for values llama.cpp would reject or misread."""
        if self.temp < 0:
            raise ChainError(f"--temp {self.temp} must be >= 0 (0 is greedy)")
        if not 0.0 <= self.top_p <= 1.0:
            raise ChainError(f"--top-p {self.top_p} must be in [0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ChainError(f"--min-p {self.min_p} must be in [0, 1]")
        if self.repeat_penalty <= 0:
            raise ChainError(f"--repeat-penalty {self.repeat_penalty} must be > 0 (1 disables it)")
        if self.seed is not None and not 0 <= self.seed < 2**32 - 1:
            raise ChainError(f"--seed {self.seed} must be in [0, 2^32 - 2]")


@dataclass
class StageInfo:
    """What a stage said in its HELLO_OK handshake."""

    host: str
    port: int
    layers: LayerRange
    n_layer_full: int
    n_embd: int
    n_vocab: int
    model_sha256: str
    arch: str
    backend: str
    health: dict

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class GenerationStats:
    """Timings of one generation. Times in ms; rates in tokens/s."""

    n_prompt: int = 0
    n_generated: int = 0
    ttft_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    stage_compute_ms: list[float] = field(default_factory=list)
    stage_rtt_ms: list[float] = field(default_factory=list)  # client-measured round trips
    wire_bytes: list[int] = field(default_factory=list)
    # why generation ended: "eog" (an end-of-generation token was sampled; it is not part of the
    # output), "n_predict" (the token budget), "context" (the session's context is full), or ""
    # (not ended: the caller stopped reading, or an error)
    stop_reason: str = ""

    @property
    def prefill_tps(self) -> float:
        return self.n_prompt / (self.prefill_ms / 1e3) if self.prefill_ms > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        steps = max(self.n_generated - 1, 0)
        return steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    @property
    def stage_network_ms(self) -> list[float]:
        return [max(r - c, 0.0) for r, c in zip(self.stage_rtt_ms, self.stage_compute_ms)]


def validate_chain(infos: Sequence[StageInfo]) -> list[StageInfo]:
    """Sort stages by layer range and check they form one model, in order, without gaps.

    Returns the stages sorted by ``layer_start``. Raises ChainError naming the stage at fault for:
    mixed models (sha256 or n_layer_full differ), mismatched n_embd, a gap, a partial overlap,
    a chain that does not start at layer 0 or end at the last layer, and two stages with the same
    range (replicas: group them first with :func:`group_replicas`, as Chain does).
    """
    if not infos:
        raise ChainError("the chain is empty: give --chain host:port,host:port,...")
    ordered = sorted(infos, key=lambda s: (s.layers.start, s.layers.end))
    ref = ordered[0]
    for s in ordered[1:]:
        if s.model_sha256 != ref.model_sha256 or s.n_layer_full != ref.n_layer_full:
            raise ChainError(
                f"stage {s.address} serves another model (sha256 {s.model_sha256[:12]}, "
                f"{s.n_layer_full} layers) than {ref.address} (sha256 {ref.model_sha256[:12]}, "
                f"{ref.n_layer_full} layers); slice one model for the whole chain")
        if s.n_embd != ref.n_embd:
            raise ChainError(f"stage {s.address} has n_embd {s.n_embd} but {ref.address} has "
                             f"{ref.n_embd}; these are not slices of one model")
    expect = 0
    prev: StageInfo | None = None
    for s in ordered:
        if prev is not None and s.layers == prev.layers:
            raise ChainError(
                f"stages {prev.address} and {s.address} both serve layers {s.layers}: a path takes one "
                "stage per range (Chain groups replicas with group_replicas)")
        if s.layers.start > expect:
            missing = LayerRange(expect, s.layers.start)
            raise ChainError(f"no stage serves layers {missing}: the chain has a gap before "
                             f"{s.address}")
        if s.layers.start < expect:
            raise ChainError(f"stage {s.address} (layers {s.layers}) overlaps {prev.address} "
                             f"(layers {prev.layers}); stages must cut the model into disjoint ranges")
        expect = s.layers.end
        prev = s
    if expect != ref.n_layer_full:
        missing = LayerRange(expect, ref.n_layer_full)
        raise ChainError(f"no stage serves layers {missing}: the chain ends at {prev.address}")
    return ordered


def health_score(health: dict) -> float:
    """How loaded a stage is, from its HELLO_OK health; lower is healthier. The score is
    ``sessions_active / max_sessions + kv_tokens_used / (n_ctx_session * max_sessions) +
    queue_depth``: the share of session slots taken, plus the share of KV positions in use, plus
    the requests waiting in its queue (each counts as a full stage's worth of load)."""
    slots = health.get("sessions_active", 0) / max(1, health.get("max_sessions", 1))
    kv = health.get("kv_tokens_used", 0) / max(1, health.get("n_ctx_session", 1) * health.get("max_sessions", 1))
    return slots + kv + health.get("queue_depth", 0)


def hung(health: dict, timeout_s: float) -> bool:
    """Whether a stage that answers HELLO is nonetheless hung: it is computing (``busy_ms`` > 0)
    and its llama_decode has made no progress (graph nodes) for at least half of ``timeout_s``
    (``stalled_ms``). A client whose wait expired after ``timeout_s`` without a PROGRESS frame
    sees at least that much on a hung stage, while a slow stage that advances shows a few hundred
    ms at most (cpp/stage/server.cpp sends PROGRESS every 500 ms while the counter moves)."""
    return health.get("busy_ms", 0) > 0 and health.get("stalled_ms", 0) >= timeout_s * 1000 / 2


def group_replicas(infos: Sequence[StageInfo]) -> list[list[StageInfo]]:
    """Group stages that serve the same layer range (replicas), each group healthiest first
    (:func:`health_score`, then address), groups in layer order, and check that one stage of each
    group forms a valid chain (:func:`validate_chain`). Raises ChainError as validate_chain does,
    and when a replica serves another model than the rest of its group."""
    groups: dict[tuple[int, int], list[StageInfo]] = {}
    for st in infos:
        groups.setdefault((st.layers.start, st.layers.end), []).append(st)
    reps = [sorted(g, key=lambda x: (health_score(x.health), x.address)) for g in groups.values()]
    for g in reps:
        for st in g[1:]:
            if st.model_sha256 != g[0].model_sha256 or st.n_embd != g[0].n_embd:
                raise ChainError(f"replicas {g[0].address} and {st.address} of layers {st.layers} serve different "
                                 "models; slice one model for the whole chain")
    validate_chain([g[0] for g in reps])
    return sorted(reps, key=lambda g: g[0].layers.start)


RETRY_CODES = ("transport", "timeout", "next_hop")
"""StageError codes after which :meth:`Session.recover` looks for a dead stage: this client lost a
stage (transport), waited past its timeout, or a stage could not reach the next one on the route
(next_hop, cpp/protocol/protocol.h). When every stage still answers, the error is raised as is."""


class FailoverError(StageError):
    """A stage died (or stopped answering) and no replica of its layer range could take over.

    ``tokens`` holds the tokens generated before the failure (the text is already streamed);
    ``stage`` the dead stage's address and ``layers`` its range."""

    def __init__(self, message: str, stage: str, layers: LayerRange, tokens: list[int] | None = None) -> None:
        super().__init__(message, "unavailable")
        self.stage = stage
        self.layers = layers
        self.tokens = list(tokens or [])


DRAFT_MAX_LIMIT = 64  # most draft tokens per speculative window a stage accepts (cpp/stage/stage.cpp)


def _open_args(sampler: SamplerParams, stop_tokens: Sequence[int], n_predict: int, ignore_eog: bool,
               draft_max: int = 0) -> dict:
    """The keyword arguments of StageClient.open for these settings; ``seed=None`` draws one."""
    seed = sampler.seed if sampler.seed is not None else random.getrandbits(32) % (2**32 - 1)
    return dict(temp=sampler.temp, top_k=sampler.top_k, top_p=sampler.top_p, min_p=sampler.min_p,
                repeat_penalty=sampler.repeat_penalty, repeat_last_n=sampler.repeat_last_n, seed=seed,
                stop_tokens=list(stop_tokens), n_predict=n_predict, ignore_eog=ignore_eog, draft_max=draft_max)


def _check_draft_max(draft_max: int) -> None:
    """Raise ChainError unless ``draft_max`` is 0 (speculative decoding off) .. DRAFT_MAX_LIMIT."""
    if not 0 <= draft_max <= DRAFT_MAX_LIMIT:
        raise ChainError(f"--draft-max {draft_max} must be in 0..{DRAFT_MAX_LIMIT} (0: no speculative decoding)")


def _tokens_of(reply: dict) -> Iterator[dict]:
    """The last stage's reply as one reply per generated token: a speculative window's reply
    carries several (``tokens``, ``pieces``), each with the ``n_past`` the session had after it;
    ``is_eog`` belongs to the last one."""
    if "tokens" not in reply:
        yield reply
        return
    toks, pieces = reply["tokens"], reply["pieces"]
    n0 = reply["n_past"] - len(toks)
    for j, (t, p) in enumerate(zip(toks, pieces, strict=True)):
        last = j == len(toks) - 1
        yield dict(reply, token=t, piece=p, n_past=n0 + j + 1, is_eog=reply["is_eog"] and last)


class Session:
    """One generation's state on every stage: a KV sequence per stage, positions, step numbers.

    Created by :meth:`Chain.session`. ``feed`` sends tokens through the chain; when ``capture``
    is set, ``hidden[i]`` collects the hidden states stage ``i`` produced (bytes of
    ``[n_tokens, n_embd] float32`` per step).
    """

    def __init__(self, chain: Chain, sampler: SamplerParams, capture: bool = False,
                 stop_tokens: Sequence[int] = (), n_predict: int = -1, ignore_eog: bool = False,
                 draft_max: int | None = None) -> None:
        sampler.check()
        self.draft_max = chain.draft_max if draft_max is None else draft_max
        _check_draft_max(self.draft_max)
        if capture and chain.forwarding:
            raise ChainError("capturing hidden states needs the client-relayed path (forwarding=False)")
        self.chain = chain
        self.id = random.getrandbits(63) or 1
        # the session's secret on every stage: the stages that forward its steps show it; another
        # client, which sees session ids in stats, cannot write into it (cpp/protocol/protocol.h)
        self.token = secrets.randbits(64) or 1
        self.n_past = 0
        self.step = 0
        self.capture = capture
        self.hidden: list[list[bytes]] = [[] for _ in chain.stages]
        self.compute_us = [0] * len(chain.stages)
        self.rtt_us = [0] * len(chain.stages)
        self.wire_bytes = [0] * len(chain.stages)
        self._open_args = _open_args(sampler, stop_tokens, n_predict, ignore_eog, self.draft_max)
        self._opened: list[int] = []
        # the token chunks fed so far, in order (the batch boundaries), as the KV cache keeps
        # them; ``fed[j]`` is what step j decoded: log[j] followed by the rejected drafts of a
        # speculative window. A replica that takes over a layer range is rebuilt by replaying
        # exactly these steps (the same rows, the same roll-backs).
        self.log: list[list[int]] = []
        self.fed: list[list[int]] = []
        # speculative decoding: windows verified, draft tokens sent and accepted (this session)
        self.spec_windows = self.spec_drafted = self.spec_accepted = 0
        self.n_generated = 0  # tokens a ring has delivered (the last stage counts them for n_predict)
        # called as on_prefill(done, total) tokens after each n_batch chunk of a multi-chunk feed
        self.on_prefill: Callable[[int, int], None] | None = None
        self.n_ctx = 2**31 - 1  # positions each stage holds for this session (the smallest wins)
        # the first stage picks the KV sequence id and every other stage is asked for the same one,
        # so a batch of several sessions is cut into the same ubatches on every stage
        self.seq = -1
        self.refeeds = 0  # times a rollback needed the session fed again (window_lost, see truncate)
        try:
            for i in range(len(chain.clients)):
                self._open_on(i)
        except StageError:
            self.close()
            raise

    @property
    def tokens(self) -> list[int]:
        """Every token the stages hold for this session, in position order (``n_past`` of them)."""
        return [t for chunk in self.log for t in chunk]

    def reconfigure(self, sampler: SamplerParams, stop_tokens: Sequence[int] = (), n_predict: int = -1,
                    ignore_eog: bool = False) -> None:
        """New sampling settings and stop rule for the next generation, keeping every stage's KV
        cache (OPEN with ``reuse``): a server continuing a conversation uses this with
        :meth:`truncate` to the common prompt prefix. Raises StageError when a stage dropped the
        session (e.g. it expired): open a new one then."""
        sampler.check()
        self._open_args = _open_args(sampler, stop_tokens, n_predict, ignore_eog, self.draft_max)
        for i in self._opened:
            self.chain.clients[i].open(self.id, seq=self.seq, reuse=True, token=self.token, **self._open_args)
        self.n_generated = 0

    def _open_on(self, i: int) -> None:
        """Open this session on range ``i``'s stage; a stage over its limits ("overloaded") hands
        the range to the next replica, if the chain has one."""
        while True:
            try:
                n_ctx, seq = self.chain.clients[i].open(self.id, seq=self.seq, token=self.token, **self._open_args)
                break
            except StageError as e:
                if e.code != "overloaded" or not self.chain.next_replica(i):
                    raise
        self._opened.append(i)
        self.seq = seq
        self.n_ctx = min(self.n_ctx, n_ctx)

    def feed(self, tokens: Sequence[int], sample: bool = True) -> dict | None:
        """Run ``tokens`` (at the next positions) through every stage, cut in chunks of n_batch.

        Returns the last stage's reply for the last chunk (``token``, ``is_eog``, ``piece`` when
        ``sample``). Raises StageError (naming the stage) when a stage refuses or goes away.
        """
        if not tokens:
            raise ChainError("nothing to feed: the prompt is empty")
        if self.n_past + len(tokens) > self.n_ctx:
            raise ChainError(f"{self.n_past} cached + {len(tokens)} new tokens do not fit the session "
                             f"context of {self.n_ctx} tokens; start the stages with a larger --ctx")
        chunks = self._chunks(tokens)
        if self._pipelined(chunks):
            return self._prefill(chunks, sample)
        result = None
        done = 0
        for i, chunk in enumerate(chunks):
            result = self._forward(chunk, sample and i == len(chunks) - 1)
            done += len(chunk)
            if self.on_prefill is not None and len(chunks) > 1:
                self.on_prefill(done, len(tokens))
        return result

    def _chunks(self, tokens: Sequence[int]) -> list[list[int]]:
        """The steps a prompt is fed in: micro-batches of ``prefill_chunk`` tokens when the chain
        forwards (they flow through the stages in a pipeline, :meth:`_prefill`), else chunks of
        n_batch."""
        size = self.chain.n_batch
        if self.chain.prefill_chunk > 0 and self.chain.forwarding and len(self.chain.clients) > 1:
            size = min(size, self.chain.prefill_chunk)
            if len(tokens) > size and self.chain.prefill_ramp:
                # Short micro-batches at both ends: the pipeline fills after a short first one, and
                # drains after a short last one. Between them every stage keeps busy, so time to
                # first token ~ t(first) + one stage's whole prompt + t(last) on the last stage.
                edge = max(1, size // PREFILL_RAMP)
                chunks = [list(tokens[:edge])]
                end = max(edge, len(tokens) - edge)
                chunks += [list(tokens[i:min(i + size, end)]) for i in range(edge, end, size)]
                if end < len(tokens):
                    chunks.append(list(tokens[end:]))
                return chunks
        return [list(tokens[i:i + size]) for i in range(0, len(tokens), size)]

    def _pipelined(self, chunks: list[list[int]]) -> bool:
        return len(chunks) > 1 and self.chain.forwarding and len(self.chain.clients) > 1

    def _prefill(self, chunks: list[list[int]], sample: bool, ring: bool = False) -> dict | None:
        """Pipelined prefill: the micro-batches go to the first stage without waiting for the
        chain, at most ``len(stages) + 1`` in flight, so the first stage runs chunk c+1 while the
        second runs chunk c. Every stage decodes one session's steps in order (a batch takes at
        most one step per session), so the KV cache is built from the same ubatches as one chunk
        after another, and the output equals the unsplit model fed the same ubatches.

        Returns the last stage's reply to the last chunk; with ``ring`` the last chunk starts the
        ring and its replies are left to the caller (returns None). A stage that dies fails over
        as in :meth:`recover` and the chunks not yet answered are sent again."""
        total = sum(len(c) for c in chunks)
        depth = len(self.chain.clients) + 1
        done = 0
        while True:
            sent: list[int] = []  # request ids of the chunks in flight, oldest first
            try:
                nxt, pos, reply = done, self.n_past, None
                while done < len(chunks):
                    while nxt < len(chunks) and len(sent) < depth:
                        last = nxt == len(chunks) - 1
                        chunk = chunks[nxt]
                        self.chain.clients[0].send_forward(
                            self.id, self.step + nxt - done, list(range(pos, pos + len(chunk))), chunk,
                            sample and last, self.chain.route, self.chain.ring_route if ring and last else "",
                            self.token)
                        sent.append(self.chain.clients[0].last_request_id)
                        pos += len(chunk)
                        nxt += 1
                    if ring and done == len(chunks) - 1:
                        return None  # the ring's first reply is the caller's to wait for
                    try:
                        reply = _nakshatra.wait_forward_ok(self.chain.clients, int(self.chain.timeout_s * 1000),
                                                           sent[0])
                    except StageError as e:
                        raise StageError(f"prefill step {self.step}: {e}", e.code) from None
                    sent.pop(0)
                    self.compute_us[-1] += reply["compute_us"]
                    self.wire_bytes[-1] += reply["wire_bytes"]
                    self._commit(chunks[done], len(chunks[done]))
                    self.step += 1
                    done += 1
                    if self.on_prefill is not None:
                        self.on_prefill(sum(len(c) for c in chunks[:done]), total)
                return reply
            except StageError as e:
                if e.code not in RETRY_CODES or isinstance(e, FailoverError):
                    raise
                self.recover(e)  # every stage back to the chunks answered; send the rest again

    def _forward(self, chunk: list[int], sample: bool, spec: bool = False) -> dict:
        """One step through the chain; when a stage has died or stopped answering, its range goes
        to a replica rebuilt by replaying this session's chunks, and the step is retried.
        ``spec``: ``chunk`` is a speculative window (the sampled token, then drafts) that the
        last stage verifies; the session keeps the rows it accepted."""
        while True:
            try:
                pos0 = self.n_past
                reply = self._forward_once(chunk, sample, spec)
                self._commit(chunk, reply["n_past"] - pos0 if spec else len(chunk), reply)
                return reply
            except StageError as e:
                if e.code not in RETRY_CODES or isinstance(e, FailoverError):
                    raise
                self.recover(e)

    def _commit(self, fed: list[int], kept: int, reply: dict | None = None) -> None:
        """Record a step that decoded ``fed`` at the next positions, of which the first ``kept``
        rows stay in every stage's KV cache (all of them but a speculative window's rejected
        drafts, which the stages drop when the next step arrives)."""
        self.log.append(list(fed[:kept]))
        self.fed.append(list(fed))
        self.n_past += kept
        if reply is not None and reply.get("drafts"):
            self.spec_windows += 1
            self.spec_drafted += len(reply["drafts"])
            self.spec_accepted += kept - 1

    def recover(self, error: StageError) -> None:
        """Move every layer range whose stage no longer answers to a live replica, rebuild that
        replica's KV by replaying the session's chunks (same batch boundaries, so greedy output is
        identical), and roll every other stage back to the last committed position. Raises
        FailoverError naming the dead stage and its layers when no replica answers, and ``error``
        itself when every stage still answers (not a dead stage)."""
        dead = [i for i in range(len(self.chain.stages)) if not self.chain.alive(i)]
        if not dead:
            raise error
        for i in dead:
            gone = self.chain.stages[i]
            if not self.chain.next_replica(i):
                raise FailoverError(
                    f"stage {gone.address} (layers {gone.layers}) stopped answering ({error}) and no replica of "
                    f"layers {gone.layers} is left; start one (nak serve SLICE --layers ...) and run again",
                    gone.address, gone.layers) from None
            self._opened = [j for j in self._opened if j != i]
            self._open_on(i)
            self._replay(i)
        # a stage that computed part of the failed step drops it; its sliding-window cache may
        # have lost what that takes (window_lost): then every stage is fed the session again
        if self._truncate_all(self.n_past, self.step, self.n_generated):
            self._refeed()

    def _replay(self, i: int) -> None:
        """Rebuild range ``i``'s KV on its (new) stage: the logged chunks go through stages
        0..i-1 under a temporary session (their own KV for this session stays untouched) and
        their hidden states into stage ``i``, without sampling."""
        clients = self.chain.clients
        tmp = random.getrandbits(63) or 2
        opened = []
        last = i == len(clients) - 1
        try:
            for j in range(i):
                clients[j].open(tmp, temp=0.0)
                opened.append(j)
            pos = 0
            for step, (kept, chunk) in enumerate(zip(self.log, self.fed, strict=True)):
                # a window with rejected rows: its next step starts inside it (the roll-back)
                spec = len(chunk) > len(kept)
                positions = list(range(pos, pos + len(chunk)))
                embd, dtype = None, 1
                for j in range(i):
                    r = clients[j].forward(tmp, step, positions, tokens=chunk if j == 0 else None, embd=embd,
                                           sample=False, dtype=dtype, spec=spec)
                    embd, dtype = r["embd"], r["dtype"] or 1
                clients[i].forward(self.id, step, positions, tokens=chunk if (i == 0 or last) else None,
                                   embd=embd, sample=False, dtype=dtype, spec=spec)
                pos += len(kept)
        finally:
            for j in opened:
                try:
                    clients[j].close_session(tmp)
                except StageError:
                    pass

    def _forward_once(self, chunk: list[int], sample: bool, spec: bool = False) -> dict:
        if self.chain.forwarding and len(self.chain.clients) > 1:
            return self._forward_routed(chunk, sample, spec)
        pos = list(range(self.n_past, self.n_past + len(chunk)))
        embd = None
        dtype = 1  # NAK_DTYPE_F32; a stage started with --wire sends bf16 or q8r
        reply: dict = {}
        n = len(self.chain.clients)
        for i, c in enumerate(self.chain.clients):
            last = i == n - 1
            t0 = time.perf_counter_ns()
            try:
                reply = c.forward(self.id, self.step, pos,
                                  tokens=chunk if (i == 0 or last) else None,
                                  embd=embd, sample=sample and last, dtype=dtype, spec=spec)
            except StageError as e:
                s = self.chain.stages[i]
                raise StageError(f"stage {s.address} (layers {s.layers}): {e}", e.code) from None
            self.rtt_us[i] += (time.perf_counter_ns() - t0) // 1000
            self.compute_us[i] += reply["compute_us"]
            self.wire_bytes[i] += reply["wire_bytes"]
            embd = reply["embd"]
            dtype = reply["dtype"] or 1
            if self.capture and not last:
                self.hidden[i].append(embd)
        self.step += 1
        return reply

    def relay(self, prompt_tokens: Sequence[int], n_predict: int) -> Iterator[dict]:
        """Prefill, then one :meth:`feed` per sampled token (relayed or forwarded, as the chain
        is set). Yields the last stage's replies, the final one included, and stops at end of
        generation, after ``n_predict`` tokens (``-1``: no limit) or when the context is full."""
        reply = self.feed(prompt_tokens, sample=True)
        produced = 0
        while True:
            for r in _tokens_of(reply):
                yield r
                produced += 1
                if self._last(r, produced, n_predict):
                    return
            # speculative decoding: the last stage drafted what may follow; send it as a window
            drafts = list(reply.get("next_drafts") or ())
            reply = self._forward([reply["token"]] + drafts, True, spec=bool(drafts))

    def _last(self, reply: dict, produced: int, n_predict: int) -> bool:
        """Whether generation ends with this reply (one token's): end of generation,
        ``n_predict`` tokens, or a full context. The last stage applies the same rule to stop a
        ring and a speculative window (cpp/stage/executor.cpp, ring_next; cpp/stage/sampling.cpp,
        ends_generation), so client and stages stop together."""
        return bool(reply["is_eog"]) or produced == n_predict or reply["n_past"] + 1 > self.n_ctx

    def ring(self, prompt_tokens: Sequence[int], n_predict: int) -> Iterator[dict]:
        """Ring mode: prefill through the forwarding chain, then the last stage hands each sampled
        token straight to the first stage; this client only receives the stream. Yields the last
        stage's replies (``token``, ``is_eog``, ``piece``, ``n_past``), the final one included; the
        stages and this loop stop by the same rule (end of generation, ``n_predict``, full context).
        A stage that dies fails over as in :meth:`recover`, and the ring starts again from the
        last token received.
        """
        tokens = list(prompt_tokens)
        if self.n_past + len(tokens) > self.n_ctx:
            raise ChainError(f"{self.n_past} cached + {len(tokens)} new tokens do not fit the session "
                             f"context of {self.n_ctx} tokens; start the stages with a larger --ctx")
        if not tokens:
            raise ChainError("nothing to feed: the prompt is empty")
        # the same chunks as feed(), pipelined: the last one starts the ring
        chunks = self._chunks(tokens)
        feed = chunks[-1]
        sent = False
        if self._pipelined(chunks):
            self._prefill(chunks, True, ring=True)
            sent = True
        self.n_generated = 0
        while True:
            pos = list(range(self.n_past, self.n_past + len(feed)))
            try:
                if not sent:
                    self.chain.clients[0].send_forward(self.id, self.step, pos, feed, True, self.chain.route,
                                                       self.chain.ring_route, self.token)
                sent = False
                while True:
                    try:
                        reply = _nakshatra.wait_forward_ok(self.chain.clients, int(self.chain.timeout_s * 1000),
                                                           self.chain.clients[0].last_request_id)
                    except StageError as e:
                        raise StageError(f"ring step {self.step}: {e}", e.code) from None
                    # what the stages consumed to produce this reply: the token (or prompt chunk)
                    # sent, and the drafts of a speculative window, of which n_past says how many stay
                    fed = feed + list(reply.get("drafts") or ())
                    self._commit(fed, reply["n_past"] - self.n_past, reply)
                    feed = [reply["token"]]
                    self.step = reply["step"] + 1
                    for r in _tokens_of(reply):
                        self.n_generated += 1
                        yield r
                        if self._last(r, self.n_generated, n_predict):
                            return
            except StageError as e:
                if e.code not in RETRY_CODES or isinstance(e, FailoverError):
                    raise
                self.recover(e)  # then start the ring again with the token not yet consumed

    def _forward_routed(self, chunk: list[int], sample: bool, spec: bool = False) -> dict:
        """Forwarding: the first stage sends its hidden state straight to the next and so on; the
        last stage answers this client. One client round trip per step instead of one per stage."""
        pos = list(range(self.n_past, self.n_past + len(chunk)))
        t0 = time.perf_counter_ns()
        sent = self.chain.clients[0].send_forward(self.id, self.step, pos, chunk, sample, self.chain.route,
                                                  "", self.token, spec)
        try:
            reply = _nakshatra.wait_forward_ok(self.chain.clients, int(self.chain.timeout_s * 1000),
                                                    self.chain.clients[0].last_request_id)
        except StageError as e:
            raise StageError(f"forwarded step {self.step}: {e}", e.code) from None
        self.rtt_us[-1] += (time.perf_counter_ns() - t0) // 1000
        self.compute_us[-1] += reply["compute_us"]
        self.wire_bytes[0] += sent
        self.wire_bytes[-1] += reply["wire_bytes"]
        self.step += 1
        return reply

    def truncate(self, pos: int) -> None:
        """Drop cached positions ``>= pos`` on every stage (KV rollback).

        A stage whose sliding-window layers keep only the window plus one ubatch (the default;
        ``nak serve --swa-full`` keeps the whole context) cannot roll back further than about
        ``n_ubatch`` positions: it refuses (``window_lost``) and the session is fed again from
        position 0 in its logged chunks (the same ubatches, so greedy output is unchanged), which
        costs one prefill of ``pos`` tokens. Raises StageError when a stage refuses otherwise or
        goes away, ChainError when ``pos`` is outside ``0..n_past``.
        """
        if not 0 <= pos <= self.n_past:
            raise ChainError(f"cannot truncate to {pos}: the session holds {self.n_past} positions")
        lost = self._truncate_all(pos)
        self.n_past = pos
        kept, fed, n = [], [], 0
        for chunk, rows in zip(self.log, self.fed, strict=True):
            if n >= pos:
                break
            kept.append(chunk[:pos - n])
            # a step cut short keeps only what stays; a whole one keeps its roll-back
            fed.append(rows if len(kept[-1]) == len(chunk) else kept[-1])
            n += len(kept[-1])
        self.log, self.fed = kept, fed
        if lost:
            self._refeed()

    def _truncate_all(self, pos: int, *step_and_generated: int) -> bool:
        """TRUNCATE every stage to ``pos`` (with the step and generated counters when given);
        True when a stage's sliding-window cache could not (``window_lost``): the caller must
        :meth:`_refeed` the session."""
        lost = False
        for c in self.chain.clients:
            try:
                c.truncate(self.id, pos, *step_and_generated)
            except StageError as e:
                if e.code != "window_lost":
                    raise
                lost = True
        return lost

    def _refeed(self) -> None:
        """Empty the session on every stage and feed it its logged steps again, without
        sampling: the KV cache is rebuilt exactly as the original steps built it (a speculative
        window's rejected rows included, and dropped by the step after it)."""
        steps = list(zip(self.log, self.fed, strict=True))
        self._truncate_all(0, self.step, self.n_generated)  # position 0 is always kept; align counters
        self.n_past, self.log, self.fed = 0, [], []
        for kept, rows in steps:
            self._forward_once(rows, False, len(rows) > len(kept))
            self._commit(rows, len(kept))
        self.refeeds += 1

    def close(self) -> None:
        """Free this session's KV on every stage (errors ignored: a dead stage has freed it)."""
        for i in self._opened:
            try:
                self.chain.clients[i].close_session(self.id)
            except StageError:
                pass
        self._opened = []

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Chain:
    """A client of a chain of stages, e.g. ``Chain(["127.0.0.1:7071", "127.0.0.1:7072"])``.

    Stages may be given in any order; they are sorted by layer range and validated
    (:func:`validate_chain`). With ``forwarding`` each stage sends its hidden state straight to the
    next (the client talks to the first stage and hears from the last); without it the client
    relays every hidden state. Both give the same tokens. ``hop_addresses`` maps a stage's
    address as given here to the address the other stages should dial (``route`` and
    ``ring_route``), e.g. a relay in front of it. ``key``: the 32-byte cluster key
    (:func:`nakshatra.auth.load_key`) when the stages have one; it is kept as ``self.key`` and
    given to every connection the chain opens later too (the probes of :meth:`alive`, the replica
    :meth:`next_replica` switches to). ``prefill_chunk``: a forwarding chain feeds a prompt in
    micro-batches of this many tokens that flow through the stages in a pipeline (0: chunks of
    ``n_batch``, one after the other); with ``prefill_ramp`` the first and last are a quarter of
    it (the pipeline fills and drains sooner, but the ubatches differ from an unpipelined feed's).
    ``draft_max`` > 0 turns on speculative decoding for the
    sessions it opens: the last stage drafts up to that many tokens per window with llama.cpp's
    n-gram drafter and a window travels the chain as one step (see cpp/stage/speculate.h). Raises
    ChainError when a stage is unreachable, refuses the key (``unauthorized``) or the chain is
    malformed.
    """

    def __init__(self, stages: Sequence[str | tuple[str, int]], timeout_s: float = 60.0,
                 connect_timeout_s: float = 5.0, n_batch: int = DEFAULT_N_BATCH,
                 forwarding: bool = False, ring: bool = False, hop_addresses: dict[str, str] | None = None,
                 key: bytes | None = None, draft_max: int = 0, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefill_ramp: bool = False) -> None:
        _check_draft_max(draft_max)
        if prefill_chunk < 0:
            raise ChainError(f"--prefill-chunk {prefill_chunk} must be >= 0 (0: chunks of n_batch, no pipeline)")
        self.draft_max = draft_max
        self.prefill_chunk = prefill_chunk
        self.prefill_ramp = prefill_ramp
        addrs = [parse_stage_address(s) if isinstance(s, str) else s for s in stages]
        if not addrs:
            raise ChainError("the chain is empty: give --chain host:port,host:port,...")
        for a in addrs:
            if addrs.count(a) > 1:
                raise ChainError(f"stage {a[0]}:{a[1]} is listed twice; list each stage once (a replica is "
                                 "another stage serving the same layers)")
        self.n_batch = n_batch
        self.timeout_s = timeout_s
        self.key = key
        self.forwarding = forwarding or ring
        self.ring_mode = ring
        clients: dict[tuple[str, int], object] = {}
        infos = []
        down: list[str] = []  # stages that cannot be reached: skipped while a replica serves their range
        try:
            for host, port in addrs:
                try:
                    c = _nakshatra.StageClient(host, port, timeout_ms=int(timeout_s * 1000),
                                               connect_timeout_ms=int(connect_timeout_s * 1000),
                                               key=key or b"")
                    h = c.hello()
                except StageError as e:
                    if e.code not in RETRY_CODES:  # answered, but refused (key, model, version)
                        raise ChainError(f"stage {host}:{port} is not usable: {e}") from None
                    down.append(f"stage {host}:{port} is not usable: {e}")
                    continue
                if h["version"] != _nakshatra.PROTOCOL_VERSION:
                    raise ChainError(f"stage {host}:{port} speaks protocol v{h['version']}, this "
                                     f"client v{_nakshatra.PROTOCOL_VERSION}; upgrade the older one")
                clients[(host, port)] = c
                infos.append(StageInfo(host, port, LayerRange(h["layer_start"], h["layer_end"]),
                                       h["n_layer_full"], h["n_embd"], h["n_vocab"],
                                       h["model_sha256"], h["arch"], h["backend"], h["health"]))
            # replicas (stages with the same range): the healthiest of each serves, the rest wait
            if not infos:
                raise ChainError(down[0])
            try:
                self.replicas = group_replicas(infos)
            except ChainError as e:  # a range left without a stage: say which stage is down first
                raise ChainError(f"{down[0]} ({e})" if down else str(e)) from None
            self.stages = [g[0] for g in self.replicas]
        except Exception:
            for c in clients.values():
                c.close()
            raise
        self.clients = [clients[(s.host, s.port)] for s in self.stages]
        for c in clients.values():
            if not any(c is x for x in self.clients):
                c.close()
        self.connect_timeout_s = connect_timeout_s
        self.hop_addresses = dict(hop_addresses or {})
        self._routes()

    def _routes(self) -> None:
        # the stages after the first, as the first stage will pass the hidden state on; the
        # addresses must reach each stage from the previous one (on a LAN, use the hosts' addresses).
        # hop_addresses maps a stage's address as given to the one other stages should use.
        hops = [self.hop_addresses.get(s.address, s.address) for s in self.stages]
        self.route = ",".join(hops[1:])
        self.ring_route = ",".join(hops)  # ring: the last stage starts the next step at the first

    def _client(self, st: StageInfo, timeout_s: float):
        # a fresh connection to ``st`` (not yet greeted), authenticated with the chain's key
        return _nakshatra.StageClient(st.host, st.port, timeout_ms=int(timeout_s * 1000),
                                      connect_timeout_ms=int(self.connect_timeout_s * 1000),
                                      key=self.key or b"")

    @staticmethod
    def _same_stage(h: dict, st: StageInfo) -> bool:
        # a port freed by a dead stage may be taken by another process: check what answers
        return (h["model_sha256"], h["layer_start"], h["layer_end"]) == (st.model_sha256, st.layers.start, st.layers.end)

    def alive(self, i: int, timeout_s: float = 2.0) -> bool:
        """Whether range ``i``'s serving stage answers a fresh HELLO within ``timeout_s`` (as the
        same model and layer range) and is not hung (:func:`hung`: computing without progress).
        The stage's network thread answers HELLO while it computes, so a slow stage is alive; a
        stopped host (SIGSTOP, a frozen VM) answers nothing and a hung computation says so."""
        try:
            c = self._client(self.stages[i], timeout_s)
            try:
                h = c.hello()
                return self._same_stage(h, self.stages[i]) and not hung(h["health"], self.timeout_s)
            finally:
                c.close()
        except StageError:
            return False

    def next_replica(self, i: int) -> bool:
        """Hand range ``i`` to the healthiest other replica that answers (the current stage is
        dropped from the replicas). False when none is left."""
        current = self.stages[i]
        self.replicas[i] = [r for r in self.replicas[i] if r.address != current.address]
        probed = []
        for r in self.replicas[i]:
            try:
                c = self._client(r, self.timeout_s)
                h = c.hello(want_model_sha256=current.model_sha256)
            except StageError:
                continue
            if not self._same_stage(h, current) or hung(h["health"], self.timeout_s):
                c.close()
                continue
            probed.append((health_score(h["health"]), r.address, r, c))
        if not probed:
            return False
        probed.sort(key=lambda p: (p[0], p[1]))
        for _, _, _, c in probed[1:]:
            c.close()
        _, _, r, c = probed[0]
        try:
            self.clients[i].close()
        except StageError:
            pass
        self.stages[i], self.clients[i] = r, c
        self._routes()
        return True

    @property
    def first(self):
        return self.clients[0]

    def session(self, sampler: SamplerParams | None = None, capture: bool = False,
                stop_tokens: Sequence[int] = (), n_predict: int = -1, ignore_eog: bool = False,
                draft_max: int | None = None) -> Session:
        """Open a session on every stage (see :class:`Session`); the last stage ends the generation
        (``is_eog``) at an end-of-generation token (unless ``ignore_eog``, as llama.cpp's
        ``--ignore-eos``) or one of ``stop_tokens``; ``n_predict`` bounds a ring's generation.
        ``draft_max``: speculative decoding for this session (None: the chain's setting)."""
        return Session(self, sampler or SamplerParams(), capture, stop_tokens, n_predict, ignore_eog, draft_max)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` by the first stage's vocabulary (llama_tokenize)."""
        return list(self.first.tokenize(text, add_special, parse_special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.first.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt for ``[(role, content), ...]`` by the model's chat template."""
        return self.first.apply_template(list(messages), True)

    def generate_tokens(self, prompt_tokens: Sequence[int], n_predict: int = 128,
                        sampler: SamplerParams | None = None, stats: GenerationStats | None = None,
                        session: Session | None = None, stop_tokens: Sequence[int] = (),
                        on_prefill: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, bytes]]:
        """Yield ``(token, piece_bytes)`` for each generated token; stops at an end-of-generation
        token (not yielded) or after ``n_predict`` tokens (``-1``: until the context is full).
        ``on_prefill(done, total)`` reports a prompt longer than n_batch chunk by chunk."""
        own = session is None
        sess = session or self.session(sampler, stop_tokens=stop_tokens, n_predict=n_predict)
        sess.on_prefill = on_prefill
        ring = self.ring_mode and len(self.clients) > 1
        replies = sess.ring(prompt_tokens, n_predict) if ring else sess.relay(prompt_tokens, n_predict)
        out_tokens: list[int] = []
        try:
            t0 = time.perf_counter()
            t1 = None
            produced = 0
            for reply in replies:
                if t1 is None:
                    t1 = time.perf_counter()
                    if stats is not None:
                        stats.n_prompt = len(prompt_tokens)
                        stats.prefill_ms = stats.ttft_ms = (t1 - t0) * 1e3
                if reply["is_eog"]:
                    if stats is not None:
                        stats.stop_reason = "eog"
                    break
                produced += 1
                if stats is not None and sess._last(reply, produced, n_predict):
                    stats.stop_reason = "n_predict" if produced == n_predict else "context"
                out_tokens.append(reply["token"])
                if stats is not None:
                    stats.n_generated = produced
                    stats.decode_ms = (time.perf_counter() - t1) * 1e3
                yield reply["token"], reply["piece"]
            if stats is not None:
                stats.stage_compute_ms = [u / 1e3 for u in sess.compute_us]
                stats.stage_rtt_ms = [u / 1e3 for u in sess.rtt_us]
                stats.wire_bytes = list(sess.wire_bytes)
        except FailoverError as e:
            e.tokens = out_tokens  # what was generated (and streamed) before the chain broke
            raise
        finally:
            replies.close()
            if own:
                sess.close()

    def generate(self, prompt: str, n_predict: int = 128, sampler: SamplerParams | None = None,
                 chat: bool = False, stats: GenerationStats | None = None,
                 on_prefill: Callable[[int, int], None] | None = None) -> Iterator[str]:
        """Yield generated text as it comes (UTF-8 safe: a character split across tokens is held
        until complete). ``chat`` applies the model's chat template to ``prompt`` as one user turn;
        ``on_prefill(done, total)`` reports a long prompt's prefill chunk by chunk."""
        text = self.apply_chat_template([("user", prompt)]) if chat else prompt
        tokens = self.tokenize(text, add_special=True, parse_special=chat)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for _, piece in self.generate_tokens(tokens, n_predict, sampler, stats, on_prefill=on_prefill):
            out = decoder.decode(piece)
            if out:
                yield out
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
