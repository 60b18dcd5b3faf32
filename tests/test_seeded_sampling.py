"""Seeded sampling on a split chain follows the documented rule, checked by an independent sampler.

The rule (cpp/stage/stage.h, ``nak_sampler_seed_at``): the last stage samples with llama.cpp's
top-k -> top-p -> min-p -> temperature -> dist chain, and before every draw replaces the dist
sampler by ``llama_sampler_init_dist(splitmix64(seed, pos))`` where ``pos`` is the number of
positions the session has cached (the position of the token being drawn).

What is independent and what is shared:

- Independent: the sampling. ``seeded_rule.py`` reimplements the seed mix, std::mt19937,
  libstdc++'s uniform_real_distribution<double> and llama.cpp's top-k, top-p, min-p, temperature
  and dist samplers in Python, from llama.cpp's source at the pinned commit; it calls nothing of
  Nakshatra or llama.cpp (only glibc's expf/logf, which llama.cpp calls too).
- Shared: the logits. They come from the unsplit model in the patched llama.cpp
  (``Reference.step_logits``, teacher-forced on the chain's own tokens); the chain's last stage
  computes the same logits on the same llama.cpp (test_chain.py proves the split bit-exact).

The existing ``test_chain.py::test_seeded_sampling_equals_reference`` compares the chain with
``Reference.generate``, which calls the stage's own sampler helpers: it would pass with any rule
both share. This module checks the rule itself, and that a wrong seed or a position off by one
would be caught.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import seeded_rule as rule
from nakshatra import _nakshatra
from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.gguf.slicer import slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.local import LocalStages

CTX = 1024
N_PREDICT = 24
PROMPT = "Once upon a time, in a village by the sea, there lived"
RANGES = [(0, 11), (12, 13), (14, 29)]  # SmolLM2-135M's 30 layers, cut unevenly as test_chain.py
TEMP, TOP_K, TOP_P = 0.9, 100, 0.95
# (seed, min_p): with min_p 0.05 min-p cuts the candidates and top-p 0.95 never binds on this
# prompt; with min_p 0 top-p does the cutting (up to ~80 candidates). Each case checks below
# that dropping the filter doing the work changes the picks.
CASES = [(7, 0.05), (4242, 0.05), (900001, 0.05), (11, 0.0), (12, 0.0)]


@pytest.fixture(scope="module")
def stages(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("seeded3")
    m = slice_model(smollm2_path, ranges=[LayerRange(a, b + 1) for a, b in RANGES], out_dir=out, progress=False)
    with LocalStages([out / s.file for s in m.slices], threads=2, ctx=CTX, max_sessions=2) as st:
        yield st


@pytest.fixture(scope="module")
def reference(smollm2_path: Path):
    return _nakshatra.Reference(str(smollm2_path), n_ctx=CTX, n_threads=1)


# ---- the independent pieces, against known outputs ----------------------------------------

def test_mt19937_and_uniform_draw_match_libstdcxx() -> None:
    # std::mt19937: the C++ standard's check values ([rand.predef]: the 10000th output of a
    # default-constructed engine is 4123659995) and the well-known first output for 5489
    m = rule.MT19937(5489)
    assert m() == 3499211612
    for _ in range(9998):
        m()
    assert m() == 4123659995
    # std::uniform_real_distribution<double>(0, 1) on std::mt19937(seed), two draws each, printed
    # with %.17g by a program built with this machine's g++ 12 / libstdc++
    want = {0: (0.59284461651668263, 0.84426574425659828),
            1: (0.99718480823026556, 0.93255736136816547),
            123456789: (0.99064914056398745, 0.013154497727317877),
            4294967294: (0.10184899170898529, 0.94789751258733013)}
    for seed, (a, b) in want.items():
        r = rule.MT19937(seed)
        assert (rule.uniform_01(r), rule.uniform_01(r)) == (a, b), seed


def test_seed_mix_is_splitmix64_and_never_the_default_seed() -> None:
    # splitmix64's first output for state 0 is 0xe220a8397b1dcdaf (Vigna's reference code): the
    # mix of (seed 0, pos 0) is its low 32 bits
    assert rule.seed_mix(0, 0) == 0x7B1DCDAF
    mixed = {rule.seed_mix(s, p) for s in range(4) for p in range(64)}
    assert len(mixed) == 4 * 64 and rule.LLAMA_DEFAULT_SEED not in mixed


# ---- Reference.step_logits ---------------------------------------------------------------

def test_step_logits_is_teacher_forced_generate(reference) -> None:
    prompt = reference.tokenize(PROMPT)
    greedy = reference.generate(prompt, 12, temp=0.0)
    assert len(greedy) == 12
    logits = reference.step_logits(prompt, greedy[:-1])
    assert logits.dtype == np.float32 and logits.shape == (12, 49152)
    # llama.cpp's greedy sampler takes the first maximum, as argmax does
    assert [int(t) for t in np.argmax(logits, axis=1)] == greedy
    # a different continuation changes every later row, and only those
    other = reference.step_logits(prompt, [greedy[0], greedy[1] ^ 1, *greedy[2:-1]])
    assert np.array_equal(other[:2], logits[:2]) and not np.array_equal(other[2], logits[2])


def test_step_logits_refuses_bad_input(reference) -> None:
    prompt = reference.tokenize(PROMPT)
    with pytest.raises(ValueError, match="empty prompt"):
        reference.step_logits([], [1])
    with pytest.raises(ValueError, match=r"prompt token 49152 at index 1 is not in \[0, 49152\)"):
        reference.step_logits([prompt[0], 49152], [])
    with pytest.raises(ValueError, match=r"continuation token -3 at index 2"):
        reference.step_logits(prompt, [1, 2, -3])
    with pytest.raises(ValueError, match="do not fit a sequence of 1024 positions"):
        reference.step_logits(prompt, [1] * (CTX - len(prompt) + 1))
    # still usable after a refusal
    assert reference.step_logits(prompt, []).shape == (1, 49152)


# ---- the chain against the independent sampler ----------------------------------------------

def _chain_tokens(addresses: list[str], seed: int, min_p: float) -> tuple[list[int], list[int]]:
    s = SamplerParams(temp=TEMP, top_k=TOP_K, top_p=TOP_P, min_p=min_p, seed=seed)
    with Chain(addresses) as c:
        prompt = c.tokenize(PROMPT)
        with c.session(s, n_predict=N_PREDICT, ignore_eog=True) as sess:
            got = [t for t, _ in c.generate_tokens(prompt, N_PREDICT, session=sess)]
    return prompt, got


def _picks(logits: np.ndarray, n_prompt: int, seed: int, min_p: float, shift: int = 0,
           top_p: float = TOP_P) -> list[rule.Draw]:
    # the draw for generated token k is made with n_prompt + k positions cached (the stage's
    # n_past when it samples, generate's pos)
    return [rule.sample(row, n_prompt + k + shift, seed, TEMP, TOP_K, top_p, min_p)
            for k, row in enumerate(logits)]


@pytest.mark.parametrize("seed, min_p", CASES)
def test_chain_draws_what_the_documented_rule_draws(stages, reference, seed: int, min_p: float) -> None:
    prompt, got = _chain_tokens(stages.addresses, seed, min_p)
    assert len(got) == N_PREDICT
    logits = reference.step_logits(prompt, got[:-1])

    draws = _picks(logits, len(prompt), seed, min_p)
    detail = [(k, d.token, t, d.n_candidates, d.ambiguous, f"{d.margin:.2e}")
              for k, (d, t) in enumerate(zip(draws, got)) if d.token != t]
    assert [d.token for d in draws] == got, f"(step, rule, chain, candidates, tie, margin): {detail}"
    # the check means something only if the draws had choices to make
    assert sum(d.n_candidates > 1 for d in draws) >= N_PREDICT // 2

    # and it can fail: another seed, the position off by one either way, or the rule without the
    # filter that cuts the candidates here, picks differently somewhere
    wrongs = [("seed + 1", _picks(logits, len(prompt), seed + 1, min_p)),
              ("pos + 1", _picks(logits, len(prompt), seed, min_p, shift=1)),
              ("pos - 1", _picks(logits, len(prompt), seed, min_p, shift=-1))]
    if min_p > 0:
        wrongs.append(("no min-p", _picks(logits, len(prompt), seed, 0.0)))
    else:
        wrongs.append(("no top-p", _picks(logits, len(prompt), seed, min_p, top_p=1.0)))
    for name, wrong in wrongs:
        assert [d.token for d in wrong] != got, f"{name} draws the same tokens: the rule is not exercised"
