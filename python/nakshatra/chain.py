"""The client side of a chain of stages: validate the chain, open sessions, run prefill and
decode through every stage, sample on the last one, and stream text back.

How a token flows (client-relayed; stage-to-stage forwarding comes with the performance issue):
the client sends token ids to the first stage, which embeds them, runs its layers and returns the
hidden state ``[n_tokens, n_embd] float32``; the client hands that state to the next stage, and
so on; the last stage runs its layers, the output norm and the LM head, samples one token with
llama.cpp's samplers and returns it with its text piece.
"""

from __future__ import annotations

import codecs
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from . import _nakshatra
from .errors import ChainError, StageError
from .ranges import LayerRange

DEFAULT_N_BATCH = 2048  # llama.cpp's default n_batch: prompts are cut into chunks of this size


def parse_stage_address(text: str) -> tuple[str, int]:
    """Parse ``host:port`` (``[v6addr]:port`` for IPv6) into ``(host, port)``.

    Raises ChainError naming the bad entry.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ChainError(f"stage address {text!r} is not host:port (e.g. 127.0.0.1:7071)")
    return host.strip("[]"), int(port)


@dataclass
class SamplerParams:
    """llama.cpp sampler settings, applied on the last stage in llama.cpp's default order
    (penalties, top-k, top-p, min-p, temperature, dist). ``temp <= 0`` is greedy. ``seed=None``
    draws a random seed."""

    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
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
    a chain that does not start at layer 0 or end at the last layer, and replicas (two stages
    with the same range: not supported yet).
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
                f"stages {prev.address} and {s.address} both serve layers {s.layers}: replicas "
                "are not supported yet; list one of them")
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


class Session:
    """One generation's state on every stage: a KV sequence per stage, positions, step numbers.

    Created by :meth:`Chain.session`. ``feed`` sends tokens through the chain; when ``capture``
    is set, ``hidden[i]`` collects the hidden states stage ``i`` produced (bytes of
    ``[n_tokens, n_embd] float32`` per step).
    """

    def __init__(self, chain: Chain, sampler: SamplerParams, capture: bool = False,
                 stop_tokens: Sequence[int] = (), n_predict: int = -1, ignore_eog: bool = False) -> None:
        sampler.check()
        if capture and chain.forwarding:
            raise ChainError("capturing hidden states needs the client-relayed path (forwarding=False)")
        self.chain = chain
        self.id = random.getrandbits(63) or 1
        self.n_past = 0
        self.step = 0
        self.capture = capture
        self.hidden: list[list[bytes]] = [[] for _ in chain.stages]
        self.compute_us = [0] * len(chain.stages)
        self.rtt_us = [0] * len(chain.stages)
        self.wire_bytes = [0] * len(chain.stages)
        seed = sampler.seed if sampler.seed is not None else random.getrandbits(32) % (2**32 - 1)
        self._opened: list[int] = []
        self.n_ctx = 2**31 - 1  # positions each stage holds for this session (the smallest wins)
        # the first stage picks the KV sequence id and every other stage is asked for the same one,
        # so a batch of several sessions is cut into the same ubatches on every stage
        self.seq = -1
        try:
            for i, c in enumerate(chain.clients):
                n_ctx, seq = c.open(self.id, temp=sampler.temp, top_k=sampler.top_k, top_p=sampler.top_p,
                                    min_p=sampler.min_p, repeat_penalty=sampler.repeat_penalty,
                                    repeat_last_n=sampler.repeat_last_n, seed=seed, stop_tokens=list(stop_tokens),
                                    n_predict=n_predict, seq=self.seq, ignore_eog=ignore_eog)
                self._opened.append(i)
                self.seq = seq
                self.n_ctx = min(self.n_ctx, n_ctx)
        except StageError:
            self.close()
            raise

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
        result = None
        for i in range(0, len(tokens), self.chain.n_batch):
            chunk = list(tokens[i:i + self.chain.n_batch])
            last_chunk = i + self.chain.n_batch >= len(tokens)
            result = self._forward(chunk, sample and last_chunk)
        return result

    def _forward(self, chunk: list[int], sample: bool) -> dict:
        if self.chain.forwarding and len(self.chain.clients) > 1:
            return self._forward_routed(chunk, sample)
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
                                  embd=embd, sample=sample and last, dtype=dtype)
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
        self.n_past += len(chunk)
        self.step += 1
        return reply

    def relay(self, prompt_tokens: Sequence[int], n_predict: int) -> Iterator[dict]:
        """Prefill, then one :meth:`feed` per sampled token (relayed or forwarded, as the chain
        is set). Yields the last stage's replies, the final one included, and stops at end of
        generation, after ``n_predict`` tokens (``-1``: no limit) or when the context is full."""
        reply = self.feed(prompt_tokens, sample=True)
        produced = 0
        while True:
            yield reply
            produced += 1
            if self._last(reply, produced, n_predict):
                return
            reply = self.feed([reply["token"]], sample=True)

    def _last(self, reply: dict, produced: int, n_predict: int) -> bool:
        """Whether generation ends with this reply: end of generation, ``n_predict`` tokens, or a
        full context. The last stage applies the same rule to stop a ring (cpp/stage/stage.cpp,
        ring_next), so client and stages stop together."""
        return bool(reply["is_eog"]) or produced == n_predict or self.n_past + 1 > self.n_ctx

    def ring(self, prompt_tokens: Sequence[int], n_predict: int) -> Iterator[dict]:
        """Ring mode: prefill through the forwarding chain, then the last stage hands each sampled
        token straight to the first stage; this client only receives the stream. Yields the last
        stage's replies (``token``, ``is_eog``, ``piece``, ``n_past``), the final one included; the
        stages and this loop stop by the same rule (end of generation, ``n_predict``, full context).
        """
        tokens = list(prompt_tokens)
        if self.n_past + len(tokens) > self.n_ctx:
            raise ChainError(f"{self.n_past} cached + {len(tokens)} new tokens do not fit the session "
                             f"context of {self.n_ctx} tokens; start the stages with a larger --ctx")
        if not tokens:
            raise ChainError("nothing to feed: the prompt is empty")
        # the same n_batch chunks as feed(): the last one starts the ring
        cut = len(tokens) - ((len(tokens) - 1) % self.chain.n_batch + 1)
        head, last = tokens[:cut], tokens[cut:]
        for i in range(0, len(head), self.chain.n_batch):
            self._forward_routed(head[i:i + self.chain.n_batch], False)
        pos = list(range(self.n_past, self.n_past + len(last)))
        self.chain.clients[0].send_forward(self.id, self.step, pos, last, True, self.chain.route,
                                           self.chain.ring_route)
        produced = 0
        while True:
            try:
                reply = _nakshatra.wait_forward_ok(self.chain.clients, int(self.chain.timeout_s * 1000))
            except StageError as e:
                raise StageError(f"ring step {self.step}: {e}", e.code) from None
            self.n_past = reply["n_past"]
            self.step = reply["step"] + 1
            yield reply
            produced += 1
            if self._last(reply, produced, n_predict):
                return

    def _forward_routed(self, chunk: list[int], sample: bool) -> dict:
        """Forwarding: the first stage sends its hidden state straight to the next and so on; the
        last stage answers this client. One client round trip per step instead of one per stage."""
        pos = list(range(self.n_past, self.n_past + len(chunk)))
        t0 = time.perf_counter_ns()
        sent = self.chain.clients[0].send_forward(self.id, self.step, pos, chunk, sample, self.chain.route)
        try:
            reply = _nakshatra.wait_forward_ok(self.chain.clients, int(self.chain.timeout_s * 1000))
        except StageError as e:
            raise StageError(f"forwarded step {self.step}: {e}", e.code) from None
        self.rtt_us[-1] += (time.perf_counter_ns() - t0) // 1000
        self.compute_us[-1] += reply["compute_us"]
        self.wire_bytes[0] += sent
        self.wire_bytes[-1] += reply["wire_bytes"]
        self.n_past += len(chunk)
        self.step += 1
        return reply

    def truncate(self, pos: int) -> None:
        """Drop cached positions ``>= pos`` on every stage (KV rollback)."""
        if not 0 <= pos <= self.n_past:
            raise ChainError(f"cannot truncate to {pos}: the session holds {self.n_past} positions")
        for c in self.chain.clients:
            c.truncate(self.id, pos)
        self.n_past = pos

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
    (:func:`nakshatra.auth.load_key`) when the stages have one. Raises ChainError when a stage is
    unreachable, refuses the key (``unauthorized``) or the chain is malformed.
    """

    def __init__(self, stages: Sequence[str | tuple[str, int]], timeout_s: float = 60.0,
                 connect_timeout_s: float = 5.0, n_batch: int = DEFAULT_N_BATCH,
                 forwarding: bool = False, ring: bool = False, hop_addresses: dict[str, str] | None = None,
                 key: bytes | None = None) -> None:
        addrs = [parse_stage_address(s) if isinstance(s, str) else s for s in stages]
        if not addrs:
            raise ChainError("the chain is empty: give --chain host:port,host:port,...")
        self.n_batch = n_batch
        self.timeout_s = timeout_s
        self.forwarding = forwarding or ring
        self.ring_mode = ring
        clients: dict[tuple[str, int], object] = {}
        infos = []
        try:
            for host, port in addrs:
                try:
                    c = _nakshatra.StageClient(host, port, timeout_ms=int(timeout_s * 1000),
                                               connect_timeout_ms=int(connect_timeout_s * 1000),
                                               key=key or b"")
                    h = c.hello()
                except StageError as e:
                    raise ChainError(f"stage {host}:{port} is not usable: {e}") from None
                if h["version"] != _nakshatra.PROTOCOL_VERSION:
                    raise ChainError(f"stage {host}:{port} speaks protocol v{h['version']}, this "
                                     f"client v{_nakshatra.PROTOCOL_VERSION}; upgrade the older one")
                clients[(host, port)] = c
                infos.append(StageInfo(host, port, LayerRange(h["layer_start"], h["layer_end"]),
                                       h["n_layer_full"], h["n_embd"], h["n_vocab"],
                                       h["model_sha256"], h["arch"], h["backend"], h["health"]))
            self.stages = validate_chain(infos)
        except Exception:
            for c in clients.values():
                c.close()
            raise
        self.clients = [clients[(s.host, s.port)] for s in self.stages]
        # the stages after the first, as the first stage will pass the hidden state on; the
        # addresses must reach each stage from the previous one (on a LAN, use the hosts' addresses).
        # hop_addresses maps a stage's address as given to the one other stages should use.
        hops = [(hop_addresses or {}).get(s.address, s.address) for s in self.stages]
        self.route = ",".join(hops[1:])
        self.ring_route = ",".join(hops)  # ring: the last stage starts the next step at the first

    @property
    def first(self):
        return self.clients[0]

    def session(self, sampler: SamplerParams | None = None, capture: bool = False,
                stop_tokens: Sequence[int] = (), n_predict: int = -1, ignore_eog: bool = False) -> Session:
        """Open a session on every stage (see :class:`Session`); the last stage ends the generation
        (``is_eog``) at an end-of-generation token (unless ``ignore_eog``, as llama.cpp's
        ``--ignore-eos``) or one of ``stop_tokens``; ``n_predict`` bounds a ring's generation."""
        return Session(self, sampler or SamplerParams(), capture, stop_tokens, n_predict, ignore_eog)

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
                        session: Session | None = None, stop_tokens: Sequence[int] = ()) -> Iterator[tuple[int, bytes]]:
        """Yield ``(token, piece_bytes)`` for each generated token; stops at an end-of-generation
        token (not yielded) or after ``n_predict`` tokens (``-1``: until the context is full)."""
        own = session is None
        sess = session or self.session(sampler, stop_tokens=stop_tokens, n_predict=n_predict)
        ring = self.ring_mode and len(self.clients) > 1
        replies = sess.ring(prompt_tokens, n_predict) if ring else sess.relay(prompt_tokens, n_predict)
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
                    break
                produced += 1
                if stats is not None:
                    stats.n_generated = produced
                    stats.decode_ms = (time.perf_counter() - t1) * 1e3
                yield reply["token"], reply["piece"]
            if stats is not None:
                stats.stage_compute_ms = [u / 1e3 for u in sess.compute_us]
                stats.stage_rtt_ms = [u / 1e3 for u in sess.rtt_us]
                stats.wire_bytes = list(sess.wire_bytes)
        finally:
            replies.close()
            if own:
                sess.close()

    def generate(self, prompt: str, n_predict: int = 128, sampler: SamplerParams | None = None,
                 chat: bool = False, stats: GenerationStats | None = None) -> Iterator[str]:
        """Yield generated text as it comes (UTF-8 safe: a character split across tokens is held
        until complete). ``chat`` applies the model's chat template to ``prompt`` as one user turn."""
        text = self.apply_chat_template([("user", prompt)]) if chat else prompt
        tokens = self.tokenize(text, add_special=True, parse_special=chat)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for _, piece in self.generate_tokens(tokens, n_predict, sampler, stats):
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
