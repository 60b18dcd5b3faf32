"""The documented seeded-sampling rule, written again from scratch for the tests.

Nakshatra's last stage samples with llama.cpp's chain top-k -> top-p -> min-p -> temperature ->
dist, and keys the random draw of each step to (seed, position) (``nak_sampler_seed_at``,
cpp/stage/stage.h). This module reimplements that rule without calling any of it: the seed mix
(splitmix64), std::mt19937, libstdc++'s std::uniform_real_distribution<double>, and llama.cpp's
samplers at the pinned commit (vendor/llama.cpp/src/llama-sampler.cpp of the llama-cpp-python
0.3.36 sdist), step by step in llama.cpp's float32 / double order of operations. Only expf and
logf come from the C library llama.cpp itself calls (glibc's libm), because numpy's float32 exp
and log are vectorised approximations that may differ from it in the last bit.

Nothing here imports nakshatra: the tests feed it logits from the unsplit model and compare its
pick with the chain's token.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import numpy as np

F32 = np.float32
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
LLAMA_DEFAULT_SEED = 0xFFFFFFFF

_libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
_libm.expf.restype = ctypes.c_float
_libm.expf.argtypes = [ctypes.c_float]
_libm.logf.restype = ctypes.c_float
_libm.logf.argtypes = [ctypes.c_float]


def expf(x: np.float32) -> np.float32:
    return F32(_libm.expf(float(x)))


def logf(x: np.float32) -> np.float32:
    return F32(_libm.logf(float(x)))


# ---- the seed rule --------------------------------------------------------------------------

def seed_mix(seed: int, pos: int) -> int:
    """The seed of the dist sampler for a draw at ``pos``: splitmix64's finaliser of
    ``(seed << 32 | pos) + 0x9e3779b97f4a7c15``, low 32 bits, with 0xFFFFFFFF (which llama.cpp
    reads as "pick a random seed") mapped to 0."""
    z = ((((seed & MASK32) << 32) | (pos & MASK32)) + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    out = z & MASK32
    return 0 if out == LLAMA_DEFAULT_SEED else out


# ---- std::mt19937 ---------------------------------------------------------------------------

class MT19937:
    """std::mt19937 (Matsumoto & Nishimura 1998, 32-bit), seeded as std::mt19937(seed)."""

    N, M = 624, 397

    def __init__(self, seed: int) -> None:
        mt = [seed & MASK32]
        for i in range(1, self.N):
            mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & MASK32)
        self.mt = mt
        self.index = self.N

    def _twist(self) -> None:
        mt = self.mt
        for i in range(self.N):
            y = (mt[i] & 0x80000000) | (mt[(i + 1) % self.N] & 0x7FFFFFFF)
            mt[i] = mt[(i + self.M) % self.N] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
        self.index = 0

    def __call__(self) -> int:
        if self.index >= self.N:
            self._twist()
        y = self.mt[self.index]
        self.index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y & MASK32


def uniform_01(rng: MT19937) -> float:
    """std::uniform_real_distribution<double>(0, 1)(rng) in libstdc++ (GCC 12,
    bits/random.tcc): generate_canonical<double, 53> takes ceil(53 / 32) = 2 outputs,
    sum = x0 + x1 * 2^32 in double, divided by 2^64, clamped below 1; then * (b - a) + a."""
    total = 0.0
    scale = 1.0
    for _ in range(2):
        total += float(rng()) * scale
        scale *= 4294967296.0
    ret = total / scale
    if ret >= 1.0:
        ret = float(np.nextafter(1.0, 0.0))
    return ret * (1.0 - 0.0) + 0.0


# ---- llama.cpp's samplers -------------------------------------------------------------------

@dataclass
class Draw:
    token: int          # the chosen token id
    n_candidates: int   # candidates left for the dist sampler
    ambiguous: bool     # equal logits where llama.cpp's (unstable) sort order decides the pick
    margin: float       # distance of the draw's target from the nearest cumulative boundary, / sum


def sample(logits: np.ndarray, pos: int, seed: int, temp: float, top_k: int, top_p: float,
           min_p: float) -> Draw:
    """One step of top-k -> top-p(min_keep 1) -> min-p(min_keep 1) -> temp -> dist, the dist
    sampler seeded with seed_mix(seed, pos). No repetition penalty."""
    logits = np.asarray(logits, dtype=F32)
    n_vocab = logits.shape[0]

    # top-k: llama_token_data_array_partial_sort_inplace keeps the k largest, descending
    # (std::partial_sort: the order of equal logits is unspecified; flagged below)
    assert top_k > 0
    k = min(top_k, n_vocab)
    order = np.argsort(-logits, kind="stable")
    ids = [int(i) for i in order[:k]]
    lg = [F32(logits[i]) for i in ids]
    ambiguous = k < n_vocab and logits[order[k - 1]] == logits[order[k]]

    # top-p: llama_sampler_softmax_impl on sorted data (max = first), float32 exp, float32 sum,
    # float32 division; then a float32 running sum up to the first index where it reaches p
    if top_p < 1.0:
        max_l = lg[0]
        ps = []
        cum = F32(0.0)
        for x in lg:
            p = expf(F32(x - max_l))
            ps.append(p)
            cum = F32(cum + p)
        ps = [F32(p / cum) for p in ps]
        last = len(lg)
        run = F32(0.0)
        for i, p in enumerate(ps):
            run = F32(run + p)
            if run >= F32(top_p) and i + 1 >= 1:
                last = i + 1
                break
        # equal logits across the cut: the sort order decides which one stays
        ambiguous = ambiguous or (last < len(lg) and lg[last - 1] == lg[last])
        ids, lg = ids[:last], lg[:last]

    # min-p on sorted data: keep while logit >= first logit + logf(p) (float32), at least one
    if min_p > 0.0 and lg:
        min_logit = F32(lg[0] + logf(F32(min_p)))
        i = 1
        while i < len(lg):
            if lg[i] < min_logit and i >= 1:
                break
            i += 1
        ids, lg = ids[:i], lg[:i]

    # temperature: logit /= temp in float32
    assert temp > 0.0
    lg = [F32(x / F32(temp)) for x in lg]

    # dist (llama_sampler_dist_apply): one uniform double per step, drawn even for one candidate
    rng = MT19937(seed_mix(seed, pos))
    rnd = uniform_01(rng)
    if len(lg) == 1:
        return Draw(ids[0], 1, ambiguous, 1.0)
    max_l = lg[0]
    ps = [expf(F32(x - max_l)) for x in lg]
    sum_cum = 0.0
    for p in ps:
        sum_cum += float(p)           # float promoted to double, double sum
    sum_tgt = sum_cum * rnd
    run = 0.0
    sel = len(ps) - 1                 # llama.cpp's fallback (never reached in practice)
    lo = 0.0
    for i, p in enumerate(ps):
        lo = run
        run += float(p)
        if run >= sum_tgt:
            sel = i
            break
    margin = min(sum_tgt - lo, run - sum_tgt) / sum_cum
    # equal logits adjacent to the chosen one: llama.cpp's sort order could have swapped them
    ambiguous = ambiguous or any(lg[j] == lg[sel] for j in (sel - 1, sel + 1) if 0 <= j < len(lg))
    return Draw(ids[sel], len(lg), ambiguous, margin)
