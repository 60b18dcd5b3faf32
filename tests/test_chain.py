"""The split pipeline must produce what the unsplit model produces.

Reference: the whole model in one process on llama.cpp's stock code path (nakshatra._nakshatra.
Reference: llama.cpp's default context parameters, n_batch 2048, n_ubatch 512, flash-attention
auto, f16 KV), greedy. Chain: real stage processes on 127.0.0.1 fed the same prompt, cut into
the same ubatches. Tokens must be identical, and the hidden state each stage hands on must equal,
byte for byte, the reference's output of that layer (``l_out-<il>``).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from nakshatra import _nakshatra
from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.errors import StageError
from nakshatra.gguf.slicer import model_layout, slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.local import LocalStages

N_PREDICT = 32
CTX = 1024
GREEDY = SamplerParams(temp=0.0)

PROMPT = "The history of astronomy is long. Describe how early people used the stars to navigate"
# longer than gemma3-270m's 512-token sliding window, so the window really slides, and longer
# than one 512-token ubatch, so the prompt is cut into two ubatches on every stage
LONG_PROMPT = " ".join(f"Star number {i} shines in the constellation of the {['Bear', 'Swan', 'Lion', 'Hunter'][i % 4]}."
                       for i in range(70)) + " Which star shines in the constellation of the Swan?"


def cut(model: Path, ranges: list[tuple[int, int]], out: Path) -> list[Path]:
    """Slice ``model`` by inclusive ranges into ``out``; return the slice paths in layer order."""
    m = slice_model(model, ranges=[LayerRange(a, b + 1) for a, b in ranges], out_dir=out, progress=False)
    return [out / s.file for s in m.slices]


def reference_run(model: Path, prompt_tokens: list[int], boundaries: list[int], n_predict: int = N_PREDICT):
    ref = _nakshatra.Reference(str(model), n_ctx=CTX, capture_layers=[b - 1 for b in boundaries])
    tokens = ref.generate(prompt_tokens, n_predict, temp=0.0)
    hidden = {b: ref.captured(b - 1) for b in boundaries}
    return tokens, hidden


def chain_run(addresses: list[str], prompt_tokens: list[int], n_predict: int = N_PREDICT):
    with Chain(addresses) as chain:
        sess = chain.session(GREEDY, capture=True)
        with sess:
            tokens = [t for t, _ in chain.generate_tokens(prompt_tokens, n_predict, session=sess)]
        hidden = [b"".join(h) for h in sess.hidden[:-1]]
        bounds = [s.layers.end for s in chain.stages[:-1]]
    return tokens, dict(zip(bounds, hidden))


CHAINS_SMOLLM2 = {  # SmolLM2-135M has 30 layers; uneven cuts
    "1-stage": [(0, 29)],
    "2-stage": [(0, 6), (7, 29)],
    "3-stage": [(0, 11), (12, 13), (14, 29)],
    "5-stage": [(0, 0), (1, 9), (10, 18), (19, 27), (28, 29)],
}
CHAINS_GEMMA3 = {  # Gemma 3 270M has 18 layers, sliding-window period 6: cut mid-period
    "1-stage": [(0, 17)],
    "2-stage": [(0, 8), (9, 17)],
    "3-stage": [(0, 3), (4, 10), (11, 17)],
    "5-stage": [(0, 1), (2, 6), (7, 7), (8, 13), (14, 17)],
}


def _exact(model: Path, ranges, prompt: str, tmp_path: Path) -> None:
    slices = cut(model, ranges, tmp_path)
    with LocalStages(slices, threads=2, ctx=CTX, max_sessions=2) as stages:
        with Chain(stages.addresses) as c:
            prompt_tokens = c.tokenize(prompt)
            n_embd = c.stages[0].n_embd
        got_tokens, got_hidden = chain_run(stages.addresses, prompt_tokens)
    boundaries = sorted(got_hidden)
    want_tokens, want_hidden = reference_run(model, prompt_tokens, boundaries)
    assert len(want_tokens) > 0
    assert got_tokens == want_tokens
    for b in boundaries:
        want = np.frombuffer(want_hidden[b], dtype=np.float32)
        got = np.frombuffer(got_hidden[b], dtype=np.float32)
        # every prefill row and every decoded row crossed this boundary, in order
        assert got.size == want.size
        assert want.size // n_embd in (len(prompt_tokens) + len(got_tokens) - 1, len(prompt_tokens) + len(got_tokens))
        assert got.tobytes() == want.tobytes(), f"hidden state after layer {b - 1} differs (max |diff| {np.abs(got - want).max()})"


@pytest.mark.parametrize("name", list(CHAINS_SMOLLM2))
def test_exact_smollm2(smollm2_path: Path, tmp_path: Path, name: str) -> None:
    _exact(smollm2_path, CHAINS_SMOLLM2[name], PROMPT, tmp_path)


@pytest.mark.parametrize("name", list(CHAINS_GEMMA3))
def test_exact_gemma3(gemma3_path: Path, tmp_path: Path, name: str) -> None:
    _exact(gemma3_path, CHAINS_GEMMA3[name], PROMPT, tmp_path)


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_exact_long_prompt(request: pytest.FixtureRequest, tmp_path: Path, model: str) -> None:
    path = request.getfixturevalue(f"{model}_path")
    ranges = CHAINS_SMOLLM2["3-stage"] if model == "smollm2" else CHAINS_GEMMA3["3-stage"]
    _exact(path, ranges, LONG_PROMPT, tmp_path)


# ---- one shared 3-stage SmolLM2 chain for the behaviour tests below --------------------------

@pytest.fixture(scope="module")
def smol_chain(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("smol3")
    slices = cut(smollm2_path, CHAINS_SMOLLM2["3-stage"], out)
    with LocalStages(slices, threads=2, ctx=CTX, max_sessions=8) as stages:
        yield stages


def _session_stats(address: str, session_id: int) -> dict:
    import json

    host, port = address.rsplit(":", 1)
    c = _nakshatra.StageClient(host, int(port))
    try:
        c.hello()
        return json.loads(c.stats())["sessions"][str(session_id)]
    finally:
        c.close()


def test_kv_reuse_sends_one_token_per_decode_step(smol_chain) -> None:
    with Chain(smol_chain.addresses) as c:
        prompt = c.tokenize(PROMPT)
        with c.session(GREEDY) as sess:
            r = sess.feed(prompt)
            wire_after_prefill = list(sess.wire_bytes)
            for k in range(5):
                r = sess.feed([r["token"]])
                for addr in smol_chain.addresses:
                    st = _session_stats(addr, sess.id)
                    assert st["n_past"] == len(prompt) + k + 1
                    assert st["tokens_in"] == len(prompt) + k + 1
            n_embd = c.stages[0].n_embd
            # a decode step moves one hidden state (n_embd f32) per hop, plus framing
            per_step = [(w - w0) / 5 for w, w0 in zip(sess.wire_bytes, wire_after_prefill)]
            assert per_step[0] < n_embd * 4 + 300
            assert per_step[1] < 2 * n_embd * 4 + 300
            # where each decode step's time went at each stage (nak bench's time split): the 5
            # one-token steps, not the prompt; each step's time from arrival to frames ready holds
            # its llama_decode and its wait for the CPU lock
            for addr in smol_chain.addresses:
                st = _session_stats(addr, sess.id)
                assert st["decode_steps"] == st["decode_turns"] == 5, st
                assert st["decode_llama_us"] > 0
                assert st["decode_turn_us"] > st["decode_llama_us"] + st["decode_lock_us"], st


def _generate(addresses, prompt: str, n: int, sampler=GREEDY) -> list[int]:
    with Chain(addresses) as c:
        return [t for t, _ in c.generate_tokens(c.tokenize(prompt), n, sampler)]


def test_concurrent_sessions_equal_alone(smol_chain) -> None:
    prompts = ["Once upon a time", "The sun is", "Write a list of fruits:", "In 1969, humans"]
    alone = [_generate(smol_chain.addresses, p, 24) for p in prompts]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = _generate(smol_chain.addresses, prompts[i], 24)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert [results[i] for i in range(4)] == alone


def test_truncate_then_regenerate_equals_fresh(smol_chain) -> None:
    with Chain(smol_chain.addresses) as c:
        prompt = c.tokenize(PROMPT)
        fresh = [t for t, _ in c.generate_tokens(prompt, 12, GREEDY)]
        with c.session(GREEDY) as sess:
            r = sess.feed(prompt + c.tokenize(" and something else entirely", add_special=False))
            assert r["token"] >= 0
            sess.truncate(len(prompt) - 3)
            again = [t for t, _ in c.generate_tokens(prompt[-3:], 12, session=sess)]
    assert again == fresh


def test_seeded_sampling_is_repeatable(smol_chain) -> None:
    s = SamplerParams(temp=0.9, top_k=50, top_p=0.9, min_p=0.0, repeat_penalty=1.1, seed=1234)
    a = _generate(smol_chain.addresses, "My favourite colour is", 24, s)
    b = _generate(smol_chain.addresses, "My favourite colour is", 24, s)
    assert a == b


def test_seeded_sampling_equals_reference(smol_chain, smollm2_path: Path) -> None:
    s = SamplerParams(temp=0.9, top_k=50, top_p=0.9, min_p=0.05, repeat_penalty=1.1, repeat_last_n=64, seed=7)
    with Chain(smol_chain.addresses) as c:
        prompt = c.tokenize("My favourite colour is")
        got = [t for t, _ in c.generate_tokens(prompt, 24, s)]
    ref = _nakshatra.Reference(str(smollm2_path), n_ctx=CTX)
    want = ref.generate(prompt, 24, temp=0.9, top_k=50, top_p=0.9, min_p=0.05, repeat_penalty=1.1,
                        repeat_last_n=64, seed=7)
    assert got == want


def test_session_is_freed_when_the_client_goes_away(smol_chain) -> None:
    import json

    c = Chain(smol_chain.addresses)
    sess = c.session(GREEDY)
    sess.feed(c.tokenize(PROMPT))
    c.close()  # no CLOSE sent: the stages see the connections drop

    import time

    host, port = smol_chain.addresses[1].rsplit(":", 1)
    probe = _nakshatra.StageClient(host, int(port))
    probe.hello()
    deadline = time.monotonic() + 10
    while str(sess.id) in json.loads(probe.stats())["sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert str(sess.id) not in json.loads(probe.stats())["sessions"]
    probe.close()


# ---- generality: random-weight tiny models of other architectures ----------------------------

CUT3 = [(0, 1), (2, 2), (3, 5)]
SYNTHETIC = {
    # arch: (n_layer, tied, inclusive layer ranges). Every verified architecture is here; where
    # llama.cpp computes with the layer index, a per-layer pattern or the model size, a cut lands
    # on the trap (comments), and every stage after the first receives a hidden state.
    "llama": (6, True, CUT3),
    "qwen2": (6, False, CUT3),
    "qwen3": (6, True, CUT3),
    "phi3": (6, False, CUT3),
    "qwen3moe": (6, False, CUT3),
    "gemma3": (6, False, CUT3),          # sliding-window period 6: both cuts inside it
    "granite": (6, False, CUT3),         # embedding scale on token input only
    "exaone": (6, True, CUT3),
    "xverse": (6, False, CUT3),
    "mistral3": (6, False, CUT3),
    # two leading dense layers: a stage starts inside them (layer 1), one right after (layer 3)
    "deepseek2": (6, False, [(0, 0), (1, 2), (3, 5)]),
    "glm4moe": (6, False, [(0, 0), (1, 3), (4, 5)]),  # one dense layer: cut right after it
    # sliding window on every other layer: stages start on a full (1) and a sliding (4) layer;
    # input scaled by sqrt(n_embd) on token input only
    "gemma2": (6, False, [(0, 0), (1, 3), (4, 5)]),
    "gemma": (6, False, [(0, 2), (3, 5)]),  # sqrt(n_embd) input scaling, two stages
    "smollm3": (8, True, [(0, 2), (3, 6), (7, 7)]),   # layers 3 and 7 skip RoPE: each starts a stage
    "gpt-oss": (6, False, [(0, 0), (1, 3), (4, 5)]),  # sliding period 2, attention sinks, MoE
    "command-r": (6, True, CUT3),
    "cohere2": (6, True, [(0, 2), (3, 4), (5, 5)]),   # sliding period 4: the full layer 3 starts a stage
    "olmo2": (6, False, CUT3),
    "phi2": (6, False, CUT3),
    "starcoder2": (6, False, CUT3),
    "falcon": (6, False, CUT3),
    "ernie4_5": (6, False, CUT3),
    "qwen2moe": (6, False, CUT3),
    "olmoe": (6, False, CUT3),
    "stablelm": (6, False, CUT3),
    "internlm2": (6, False, CUT3),
    "glm4": (6, False, CUT3),
}
"""The tests' list of architectures split bit-exact (nakshatra.gguf.archs.VERIFIED is the same
set, and docs/architectures.md is generated from it)."""


def test_every_verified_architecture_is_tested() -> None:
    from nakshatra.gguf.archs import VERIFIED

    assert sorted(SYNTHETIC) == sorted(VERIFIED)


VARIANTS = {
    # name: (arch, blocks, metadata over ARCH_KV, optional tensors, inclusive layer ranges)
    # a next-n (multi-token prediction) block after the 6 decoder layers, as DeepSeek V3 and
    # GLM-4.5 have: it is in no slice, and the slices load without it. (llama.cpp also loads a
    # file of the next-n block alone, so the trunk's attn_norm is asked for as well.)
    "deepseek2-next-n": ("deepseek2", 7, {"nextn_predict_layers": 1}, ("attn_norm.weight", "nextn.eh_proj.weight"),
                         [(0, 1), (2, 3), (4, 5)]),
    # variants told by the layer count: 27 layers is DeepSeek V2-Lite (no q LoRA), whose slices
    # must be read as Lite too; 46-layer Gemma 2 is the 27B, which scales attention by
    # 1/sqrt(n_embd / n_head), here 1/4, instead of 1/sqrt(head size), here 1/sqrt(32)
    "deepseek2-lite": ("deepseek2", 27, {"attention.q_lora_rank": None}, (), [(0, 12), (13, 26)]),
    "gemma2-27b": ("gemma2", 46, {"attention.key_length": 32, "attention.value_length": 32}, (),
                   [(0, 20), (21, 45)]),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exact_synthetic_variant(smollm2_path: Path, tmp_path: Path, name: str) -> None:
    from nakshatra.gguf.synthetic import write_synthetic

    arch, n_block, kv, optional, ranges = VARIANTS[name]
    model = write_synthetic(tmp_path / f"{name}.gguf", arch, n_layer=n_block, n_embd=64, n_head=4,
                            n_head_kv=1 if arch == "deepseek2" else 2, n_ff=128, tokenizer_from=smollm2_path,
                            seed=5, dtype="f32", kv=kv, optional=optional)
    if "nextn_predict_layers" in kv:  # the model holds the trunk and the next-n block; no slice holds the block
        import gguf

        names = {t.name for t in gguf.GGUFReader(model).tensors}
        assert {"blk.0.attn_q_a.weight", f"blk.{n_block - 1}.nextn.eh_proj.weight"} <= names
        assert model_layout(model).n_nextn == 1
    _exact(model, ranges, PROMPT, tmp_path / "slices")


@pytest.mark.parametrize("arch", list(SYNTHETIC))
def test_exact_synthetic_arch(smollm2_path: Path, tmp_path: Path, arch: str) -> None:
    from nakshatra.gguf.synthetic import write_synthetic

    n_layer, tied, ranges = SYNTHETIC[arch]
    model = write_synthetic(tmp_path / f"{arch}.gguf", arch, n_layer=n_layer, n_embd=64, n_head=4, n_head_kv=2,
                            n_ff=128, tokenizer_from=smollm2_path, seed=3, dtype="f32", tied=tied)
    _exact(model, ranges, PROMPT, tmp_path / "slices")


# ---- stage-to-stage forwarding ----------------------------------------------------------------

def test_forwarding_equals_the_relayed_chain(smol_chain) -> None:
    samplers = [GREEDY, SamplerParams(temp=0.9, top_k=50, top_p=0.9, min_p=0.05, repeat_penalty=1.1, seed=11)]
    for s in samplers:
        with Chain(smol_chain.addresses) as c:
            prompt = c.tokenize(LONG_PROMPT)  # two ubatches, then one-token steps
            relayed = [t for t, _ in c.generate_tokens(prompt, 24, s)]
        with Chain(smol_chain.addresses, forwarding=True) as c:
            forwarded = [t for t, _ in c.generate_tokens(prompt, 24, s)]
        assert forwarded == relayed


def test_forwarding_reports_errors_from_any_stage(smol_chain) -> None:
    with Chain(smol_chain.addresses, forwarding=True) as c:
        with c.session(GREEDY) as sess:
            sess.feed(c.tokenize("Hello"))
            sess.step += 5  # out of order: the first stage refuses it and tells this client
            with pytest.raises(StageError, match="out of order"):
                sess.feed([1])
        c.route = "127.0.0.1:1," + c.route.split(",", 1)[1]  # the next hop is dead
        with c.session(GREEDY) as sess:
            with pytest.raises(StageError, match="127.0.0.1:1 unreachable"):
                sess.feed(c.tokenize("Hello"))


def test_ring_equals_the_relayed_chain(smol_chain) -> None:
    samplers = [GREEDY, SamplerParams(temp=0.9, top_k=50, top_p=0.9, min_p=0.05, repeat_penalty=1.1, seed=5)]
    for s in samplers:
        # n_batch 256 cuts the prompt into several forwarded chunks before the ring starts
        with Chain(smol_chain.addresses, n_batch=256) as c:
            prompt = c.tokenize(LONG_PROMPT)
            relayed = [t for t, _ in c.generate_tokens(prompt, 20, s)]
        with Chain(smol_chain.addresses, n_batch=256, ring=True) as c:
            ring = [t for t, _ in c.generate_tokens(prompt, 20, s)]
            # the ring stopped exactly where the client did: the chain is reusable at once
            again = [t for t, _ in c.generate_tokens(prompt, 20, s)]
        assert ring == relayed == again


def test_ring_stops_on_every_stage_when_the_client_goes_away(smol_chain) -> None:
    import json
    import time

    c = Chain(smol_chain.addresses, ring=True)
    gen = c.generate_tokens(c.tokenize("Count from one to one thousand:"), -1, GREEDY)
    first = [next(gen) for _ in range(3)]
    assert len(first) == 3
    c.close()  # mid-ring: no CLOSE, the connections just drop
    gen.close()
    deadline = time.monotonic() + 10
    for addr in smol_chain.addresses:
        host, port = addr.rsplit(":", 1)
        probe = _nakshatra.StageClient(host, int(port))
        probe.hello()
        while json.loads(probe.stats())["sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(probe.stats())["sessions"] == {}
        probe.close()
    # and the chain serves the next client
    assert len(_generate(smol_chain.addresses, "Hello", 4)) == 4


def test_device_option_on_a_cpu_build(smollm2_path: Path, tmp_path: Path) -> None:
    """``--device none`` (llama.cpp's: the CPU alone) changes nothing on a CPU build; a GPU name
    the build does not have is refused with the devices there are, before llama.cpp sees it (it
    would abort), by the reference and by a stage."""
    from nakshatra.errors import ChainError

    if _nakshatra.build_info()["devices"]:
        pytest.skip("this build sees a GPU: tests/test_gpu.py covers --device there")
    prompt = [1, 504, 3130, 282]
    default = _nakshatra.Reference(str(smollm2_path), n_ctx=256).generate(prompt, 8, temp=0.0)
    alone = _nakshatra.Reference(str(smollm2_path), n_ctx=256, devices="none", n_gpu_layers=0)
    assert len(default) == 8 and alone.generate(prompt, 8, temp=0.0) == default
    backend = _nakshatra.build_info()["backend"]
    with pytest.raises(StageError, match=rf"no GPU device 'CUDA0' in this build \({backend}\); devices: none"):
        _nakshatra.Reference(str(smollm2_path), n_ctx=256, devices="CUDA0")
    slices = cut(smollm2_path, [(0, 29)], tmp_path)
    with pytest.raises(ChainError, match="no GPU device 'CUDA0'"):
        with LocalStages(slices, threads=2, ctx=256, max_sessions=1, stage_args=[["--device", "CUDA0"]]):
            pass
    with LocalStages(slices, threads=2, ctx=256, max_sessions=1, stage_args=[["--device", "none"]]) as stages:
        with Chain(stages.addresses) as c:
            tokens = c.tokenize("Once upon a time")
            got = [t for t, _ in c.generate_tokens(tokens, 8, GREEDY)]
    assert len(got) == 8 and got == _nakshatra.Reference(str(smollm2_path), n_ctx=256).generate(tokens, 8, temp=0.0)
