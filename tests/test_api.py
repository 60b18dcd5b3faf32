"""``nak api`` against a real chain, driven by the official ``openai`` client: answers equal the
unsplit model's (greedy), streaming equals non-streaming, concurrent requests each get their own
session, a conversation reuses the stages' KV for its common prefix exactly (checked against the
unsplit model fed the same batches), and bad requests get OpenAI-style errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from nakshatra import _nakshatra
from nakshatra.client.chain import Chain
from nakshatra.client.engine import common_prefix
from nakshatra.gguf.slicer import slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.local import LocalStages

pytestmark = pytest.mark.slow

CTX = 512
RANGES = [LayerRange(0, 9), LayerRange(9, 21), LayerRange(21, 30)]
MODEL_ID = "smollm2"


@pytest.fixture(scope="module")
def stages(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("smol-api")
    m = slice_model(smollm2_path, RANGES, out_dir=out, progress=False)
    # batching off: every session then equals its run alone (docs/performance.md, Batching and exactness)
    with LocalStages([out / s.file for s in m.slices], threads=1, ctx=CTX, max_sessions=5,
                     extra_args=["--max-batch", "1"], cpu_lock=False) as ls:
        yield ls


@pytest.fixture(scope="module")
def server(stages):
    """`nak api --chain ... --port 0` as a user starts it; yields its base URL."""
    p = subprocess.Popen([sys.executable, "-m", "nakshatra_cli", "api", "--chain", ",".join(stages.addresses),
                          "--port", "0", "--parallel", "3", "--model-id", MODEL_ID],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = p.stdout.readline().strip()
        assert url.startswith("http://"), f"nak api did not start: {url!r} {p.stderr.read() if p.poll() is not None else ''}"
        yield url
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=20)
        p.stdout.close()
        p.stderr.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chain(stages):
    with Chain(stages.addresses) as c:
        yield c


@pytest.fixture(scope="module")
def reference(smollm2_path: Path):
    return _nakshatra.Reference(str(smollm2_path), n_ctx=CTX, n_threads=1)


def _chat_tokens(chain: Chain, messages: list[dict]) -> list[int]:
    text = chain.apply_chat_template([(m["role"], m["content"]) for m in messages])
    return chain.tokenize(text, add_special=True, parse_special=True)


def _eog_trim(chain: Chain, tokens: list[int], text: str) -> list[int]:
    """The reference's tokens up to the end-of-generation the server stopped at: the prefix
    whose text is the server's answer."""
    for k in range(len(tokens), -1, -1):
        if chain.detokenize(tokens[:k]) == text:
            return tokens[:k]
    raise AssertionError(f"the answer {text!r} is no prefix of the unsplit model's {chain.detokenize(tokens)!r}")


def test_models_and_health(server, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    r = httpx.get(server + "/health")
    assert r.status_code == 200 and r.json()["stages_up"] == 3


def test_models_of_a_cluster_file_are_listed_with_their_state(stages, tmp_path: Path) -> None:
    """`nak api --cluster FILE`: the model the stages serve is "loaded", the file's other
    [[models]] "available" (tests/test_swap.py swaps to them)."""
    body = 'model = "smollm2"\n'
    for addr, rng in zip(stages.addresses, RANGES):
        host, port = addr.rsplit(":", 1)
        body += f'[[stages]]\nhost = "{host}"\nport = {port}\nlayers = "{rng.inclusive()}"\n'
    body += '[[models]]\nname = "gemma"\nmodel = "gemma3-270m"\nlayers = ["0-5", "6-11", "12-17"]\n'
    (tmp_path / "cluster.toml").write_text(body)
    p = subprocess.Popen([sys.executable, "-m", "nakshatra_cli", "api", "--cluster", str(tmp_path / "cluster.toml"),
                          "--port", "0", "--parallel", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = p.stdout.readline().strip()
        assert url.startswith("http://"), f"nak api did not start: {url!r} {p.stderr.read() if p.poll() is not None else ''}"
        data = httpx.get(url + "/v1/models").json()["data"]
        assert [(m["id"], m["state"]) for m in data] == [("smollm2", "loaded"), ("gemma", "available")]
        assert data[0]["meta"]["n_ctx"] == CTX and "meta" not in data[1]
        assert httpx.get(url + "/v1/models/gemma").json()["state"] == "available"
        assert httpx.get(url + "/v1/models/llama").status_code == 404
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=20)
        p.stdout.close()
        p.stderr.close()


def test_completion_equals_the_unsplit_model(client, chain, reference) -> None:
    prompt = "The three primary colours are"
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=20, temperature=0)
    want = reference.generate(chain.tokenize(prompt), 20)
    assert r.choices[0].text == chain.detokenize(want)
    assert r.usage.prompt_tokens == len(chain.tokenize(prompt))
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"


def test_chat_streaming_equals_non_streaming_and_the_unsplit_model(client, chain, reference) -> None:
    msgs = [{"role": "user", "content": "Name a planet of the solar system."}]
    r = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=40, temperature=0)
    text = r.choices[0].message.content
    want = reference.generate(_chat_tokens(chain, msgs), 40)
    assert text and text == chain.detokenize(_eog_trim(chain, want, text))
    chunks, usage, finish = [], None, None
    for ch in client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=40, temperature=0,
                                             stream=True, stream_options={"include_usage": True}):
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.content:
                chunks.append(c.delta.content)
            finish = c.finish_reason or finish
    assert "".join(chunks) == text
    assert len(chunks) > 1, "the answer came in one piece: not streamed"
    assert finish == r.choices[0].finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens and usage.prompt_tokens == r.usage.prompt_tokens


def test_stop_strings_and_seeded_sampling(client, chain, reference) -> None:
    prompt = "Count: one, two, three, four, five,"
    full = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert "," in full.strip(), full
    cut = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=24, temperature=0, stop=[","])
    assert cut.choices[0].text == full[:full.index(",")] and cut.choices[0].finish_reason == "stop"
    # seeded sampling is the unsplit model's sampler with the same seed (top_k 0, min_p 0: OpenAI's knobs)
    a = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.9, seed=11)
    b = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.9, seed=11)
    want = reference.generate(chain.tokenize(prompt), 16, temp=0.9, top_k=0, top_p=0.9, min_p=0.0, seed=11)
    assert a.choices[0].text == b.choices[0].text == chain.detokenize(want)
    # llama-server's extra fields (top_k, min_p, repeat_penalty) reach the sampler as well
    c = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.9, seed=11,
                                  extra_body={"top_k": 20, "min_p": 0.05, "repeat_penalty": 1.3})
    want = reference.generate(chain.tokenize(prompt), 16, temp=0.9, top_k=20, top_p=0.9, min_p=0.05,
                              repeat_penalty=1.3, seed=11)
    assert c.choices[0].text == chain.detokenize(want)


def test_concurrent_requests_each_equal_their_run_alone(client, chain, reference) -> None:
    prompts = ["Water boils at", "The largest ocean is", "A haiku about autumn:", "def fibonacci(n):"]
    got: dict[str, str] = {}
    errors: list[BaseException] = []

    def ask(p: str) -> None:
        try:
            got[p] = client.completions.create(model=MODEL_ID, prompt=p, max_tokens=24, temperature=0).choices[0].text
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]  # 4 requests, 3 workers: one waits
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for p in prompts:
        assert got[p] == chain.detokenize(reference.generate(chain.tokenize(p), 24)), p


def test_a_conversation_reuses_the_kv_of_its_prefix_exactly(client, chain, smollm2_path) -> None:
    """Turn 2 resends turn 1: the server keeps the worker's session, rolls it back to the common
    prefix and prefills only the rest. The answer must equal the unsplit model fed exactly those
    batches (turn 1's prompt, its answer one token at a time, then the rest of turn 2)."""
    turn1 = [{"role": "system", "content": "You are a geography teacher. Answer briefly."},
             {"role": "user", "content": "What is the capital of France?"}]
    r1 = client.chat.completions.create(model=MODEL_ID, messages=turn1, max_tokens=48, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And the capital of Italy?"}]
    r2 = client.chat.completions.create(model=MODEL_ID, messages=turn2, max_tokens=48, temperature=0)

    p1, p2 = _chat_tokens(chain, turn1), _chat_tokens(chain, turn2)
    ref = _nakshatra.Reference(str(smollm2_path), n_ctx=CTX, n_threads=1)
    g1 = ref.decode_batch([0] * len(p1), list(range(len(p1))), p1, [0] * (len(p1) - 1) + [1])
    answer1 = g1[:]
    pos = len(p1)
    while len(answer1) < 48:  # the server fed each token it generated, one step each
        t = ref.decode_batch([0], [pos], [answer1[-1]], [1])[0]
        pos += 1
        answer1.append(t)
    answer1 = _eog_trim(chain, answer1, r1.choices[0].message.content)
    # the tokens the worker's session holds after turn 1: an answer cut by max_tokens leaves its
    # last token unfed; one ended by end-of-generation has fed every token of its text
    held = p1 + (answer1[:-1] if r1.choices[0].finish_reason == "length" else answer1)
    keep = min(common_prefix(held, p2), len(p2) - 1)
    assert keep > len(p1), "turn 2 should share more than turn 1's prompt"
    assert r2.usage.prompt_tokens_details.cached_tokens == keep

    ref2 = _nakshatra.Reference(str(smollm2_path), n_ctx=CTX, n_threads=1)
    ref2.decode_batch([0] * len(p1), list(range(len(p1))), p1, [0] * len(p1))
    for i, t in enumerate(answer1):
        if len(p1) + i < keep:
            ref2.decode_batch([0], [len(p1) + i], [t], [0])
    rest = p2[keep:]
    out = ref2.decode_batch([0] * len(rest), list(range(keep, len(p2))), rest, [0] * (len(rest) - 1) + [1])
    pos = len(p2)
    while len(out) < 48:
        out.append(ref2.decode_batch([0], [pos], [out[-1]], [1])[0])
        pos += 1
    assert r2.choices[0].message.content == chain.detokenize(_eog_trim(chain, out, r2.choices[0].message.content))


def test_bad_requests_get_openai_errors(server, client) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and "smollm2" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=CTX)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt="word " * (CTX + 10), max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], temperature=7)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=[])
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    # the server still answers after all that
    assert client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=2).usage.completion_tokens == 2


def test_metrics_count_requests_and_tokens(server, client) -> None:
    client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=5, temperature=0)
    text = httpx.get(server + "/metrics").text
    samples = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert samples["nak_completion_tokens_total"] >= 5
    assert samples['nak_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert sum(v for k, v in samples.items() if k.startswith("nak_stage_up{")) == 3
    c = httpx.get(server + "/api/cluster").json()
    assert [s["layers"] for s in c["stages"]] == [r.inclusive() for r in RANGES]
    assert c["decode_tps"] > 0 and json.dumps(c)
    # every stage's compute per token from its own counters, and the rest spread over the legs
    assert len(c["stage_compute_ms"]) == 3 and all(ms > 0 for ms in c["stage_compute_ms"])
    assert c["hop_ms"] is not None and c["hop_ms"] >= 0


def test_nak_chat_keeps_the_conversation_and_reuses_its_kv(stages) -> None:
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "chat", "--chain", ",".join(stages.addresses),
                        "--temp", "0", "-n", "16", "--system", "Answer in one short sentence."],
                       input="What is the capital of France?\nAnd of Italy?\n\n", capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Rome" in r.stdout, r.stdout
    cached = [int(m.group(1)) for m in re.finditer(r"(\d+) of \d+ prompt tokens from the cache", r.stderr)]
    assert len(cached) == 2 and cached[0] == 0 and cached[1] > 0, r.stderr


def test_a_dead_stage_ends_the_stream_with_the_text_so_far(smollm2_path: Path, tmp_path: Path) -> None:
    """No replica left: the stream ends with an OpenAI-style error naming the dead stage and its
    layers, carrying the text produced before it (as streamed)."""
    m = slice_model(smollm2_path, RANGES, out_dir=tmp_path / "s", progress=False)
    with LocalStages([tmp_path / "s" / s.file for s in m.slices], threads=1, ctx=CTX, max_sessions=2,
                     cpu_lock=False) as ls:
        p = subprocess.Popen([sys.executable, "-m", "nakshatra_cli", "api", "--chain", ",".join(ls.addresses),
                              "--port", "0", "--parallel", "1", "--model-id", MODEL_ID, "--timeout", "10"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            url = p.stdout.readline().strip()
            body = {"model": MODEL_ID, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 400, "temperature": 0, "stream": True}
            texts, error = [], None
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    d = json.loads(line[6:])
                    if "error" in d:
                        error = d["error"]
                        continue
                    texts.extend(c["text"] for c in d["choices"])
                    if len(texts) == 8:
                        os.kill(ls.pids[1], signal.SIGKILL)
        finally:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=20)
            p.stdout.close()
    assert error is not None, "the stream ended without an error"
    assert ls.addresses[1] in error["message"] and RANGES[1].inclusive() in error["message"], error
    assert error["code"] == "stage_unavailable" and len(texts) >= 8
    assert error["text_so_far"] == "".join(texts)


def test_cluster_view_shows_live_speed_during_a_stream(server) -> None:
    """While a stream runs, /api/cluster counts it as active and gives the tokens per second of
    the last seconds (the dashboard's live figure)."""
    body = {"model": MODEL_ID, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 300, "temperature": 0, "stream": True}
    seen = None
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=120) as r:
        n = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                n += 1
            if n == 20:
                import time

                time.sleep(1.1)  # past the 1 s cache of the cluster view
                seen = httpx.get(server + "/api/cluster", timeout=30).json()
                break
    assert seen is not None, "the stream ended before 20 chunks"
    assert seen["sessions_active"] >= 1 and seen["live_tps"] > 0
