"""Small random-weight GGUF models that the pinned llama.cpp loads and runs.

Used by tests (split-vs-unsplit equivalence for every supported architecture) and benchmarks
(a llama-shaped model of a chosen parameter count). The tokenizer, and with it the vocabulary
size, is copied from a real GGUF (``tokenizer_from``, e.g. SmolLM2) so prompts tokenize as usual.

Tensor names, shapes and metadata keys follow the loaders in the pinned llama.cpp
(``src/models/<arch>.cpp``, ``src/llama-arch.cpp``, ``src/llama-model.cpp``). Shapes below are in
ggml order (``ne0`` first, the row length), the reverse of numpy's. Weights are drawn from
``numpy.random.default_rng(seed)``: matrices with std ``1/sqrt(row length)`` (each matmul keeps
unit variance, so every layer matters and logits spread about N(0, 1), which keeps the argmax
well separated from float noise), biases with std 0.02, norm weights 1. A given set of
arguments always gives the same file.

Memory is bounded by one tensor (quantized size) plus one chunk of rows in float32, so
multi-billion-parameter models can be written on a small machine.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError

ARCHS = ("llama", "qwen2", "qwen3", "phi3", "qwen3moe", "gemma3", "granite", "exaone", "xverse", "mistral3")
"""Architectures :func:`write_synthetic` can write."""

ARCH_KV = {
    # Granite's scales: the embedding scale multiplies token input on the first stage only (patch
    # 0002 keeps it off hidden-state input), the others act inside every layer and on the logits
    "granite": {"logit_scale": 0.5, "residual_scale": 0.75, "embedding_scale": 3.0, "attention_scale": 0.125},
}
"""Float metadata ``{arch}.{key}`` an architecture's loader requires or that changes its graph."""


DTYPES = ("f32", "f16", "q8_0", "q4_0")
"""Weight types for the matrices; norms, biases and the MoE router stay F32."""

BIAS_STD = 0.02
_CHUNK_ELEMS = 1 << 24  # float32 elements generated at once (64 MiB)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: ``name`` as llama.cpp expects it, ``ne`` its shape in ggml order,
    ``kind`` one of ``"weight"`` (random, stored as the chosen dtype), ``"norm"`` (ones, F32),
    ``"bias"`` (random, F32) or ``"router"`` (random, F32)."""

    name: str
    ne: tuple[int, ...]
    kind: str = "weight"


def tensor_specs(arch: str, *, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int,
                 n_vocab: int, n_expert: int = 0, tied: bool = False) -> list[TensorSpec]:
    """The tensors of a model of ``arch`` in file order (global input tensors, then blocks, then
    output tensors). ``tied`` omits ``output.weight`` (llama.cpp then reuses ``token_embd``).
    Raises ValueError for an unknown ``arch``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown synthetic architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    head = n_embd // n_head
    q, kv = head * n_head, head * n_head_kv
    specs = [TensorSpec("token_embd.weight", (n_embd, n_vocab))]
    for i in range(n_layer):
        b = f"blk.{i}."
        specs.append(TensorSpec(b + "attn_norm.weight", (n_embd,), "norm"))
        if arch == "phi3":
            specs.append(TensorSpec(b + "attn_qkv.weight", (n_embd, q + 2 * kv)))
        else:
            specs += [TensorSpec(b + "attn_q.weight", (n_embd, q)),
                      TensorSpec(b + "attn_k.weight", (n_embd, kv)),
                      TensorSpec(b + "attn_v.weight", (n_embd, kv))]
        if arch == "qwen2":
            specs += [TensorSpec(b + "attn_q.bias", (q,), "bias"),
                      TensorSpec(b + "attn_k.bias", (kv,), "bias"),
                      TensorSpec(b + "attn_v.bias", (kv,), "bias")]
        if arch in ("qwen3", "qwen3moe", "gemma3"):
            specs += [TensorSpec(b + "attn_q_norm.weight", (head,), "norm"),
                      TensorSpec(b + "attn_k_norm.weight", (head,), "norm")]
        specs.append(TensorSpec(b + "attn_output.weight", (q, n_embd)))
        if arch == "gemma3":
            specs.append(TensorSpec(b + "post_attention_norm.weight", (n_embd,), "norm"))
        specs.append(TensorSpec(b + "ffn_norm.weight", (n_embd,), "norm"))
        if arch == "phi3":
            specs += [TensorSpec(b + "ffn_up.weight", (n_embd, 2 * n_ff)),
                      TensorSpec(b + "ffn_down.weight", (n_ff, n_embd))]
        elif arch == "qwen3moe":
            specs += [TensorSpec(b + "ffn_gate_inp.weight", (n_embd, n_expert), "router"),
                      TensorSpec(b + "ffn_gate_exps.weight", (n_embd, n_ff, n_expert)),
                      TensorSpec(b + "ffn_up_exps.weight", (n_embd, n_ff, n_expert)),
                      TensorSpec(b + "ffn_down_exps.weight", (n_ff, n_embd, n_expert))]
        else:
            specs += [TensorSpec(b + "ffn_gate.weight", (n_embd, n_ff)),
                      TensorSpec(b + "ffn_up.weight", (n_embd, n_ff)),
                      TensorSpec(b + "ffn_down.weight", (n_ff, n_embd))]
        if arch == "gemma3":
            specs.append(TensorSpec(b + "post_ffw_norm.weight", (n_embd,), "norm"))
    specs.append(TensorSpec("output_norm.weight", (n_embd,), "norm"))
    if not tied:
        specs.append(TensorSpec("output.weight", (n_embd, n_vocab)))
    return specs


def write_synthetic(path: str | Path, arch: str, n_layer: int = 4, n_embd: int = 64, n_head: int = 4,
                    n_head_kv: int = 2, n_ff: int = 128, n_expert: int = 4, n_expert_used: int = 2, *,
                    tokenizer_from: str | Path, seed: int = 0, dtype: str = "f32",
                    tied: bool = False) -> Path:
    """Write a random-weight GGUF of ``arch`` to ``path`` (parent directories created; written
    to ``<path>.partial`` and renamed, so a failure leaves no file) and return the path.

    ``n_embd`` must be divisible by ``n_head``, and ``n_head`` by ``n_head_kv``; head size is
    ``n_embd // n_head``. ``n_ff`` is the FFN width (phi3: ``ffn_up`` is ``2*n_ff`` wide;
    qwen3moe: the width of each of the ``n_expert`` experts, ``n_expert_used`` routed per
    token; ignored by the others). For the quantized ``dtype``\\ s a matrix whose row length is
    not a multiple of 32 is stored as F16 instead, as llama-quantize does.

    Raises ValueError for bad shapes, unknown ``arch`` or ``dtype``; ModelError when
    ``tokenizer_from`` is not a GGUF with a tokenizer.
    """
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown synthetic architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if min(n_layer, n_embd, n_head, n_head_kv, n_ff) < 1 or n_embd % n_head or n_head % n_head_kv:
        raise ValueError(f"bad shape: n_layer={n_layer} n_embd={n_embd} n_head={n_head} "
                         f"n_head_kv={n_head_kv} n_ff={n_ff} (need n_embd % n_head == 0 and "
                         "n_head % n_head_kv == 0)")
    moe = arch == "qwen3moe"
    if moe and not 0 < n_expert_used <= n_expert:
        raise ValueError(f"need 0 < n_expert_used <= n_expert, got {n_expert_used} and {n_expert}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok_kv = _tokenizer_kv(Path(tokenizer_from))
    n_vocab = len(tok_kv["tokenizer.ggml.tokens"][1])
    specs = tensor_specs(arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                         n_ff=n_ff, n_vocab=n_vocab, n_expert=n_expert if moe else 0, tied=tied)

    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    ftype = gguf.LlamaFileType["ALL_F32" if dtype == "f32" else "MOSTLY_" + dtype.upper()]

    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(tmp, arch)
    # no arch in the name: llama.cpp applies Phi-3 tokenizer fixes to names containing "phi3"
    w.add_name("nakshatra-synthetic")
    w.add_file_type(int(ftype))
    if dtype.startswith("q"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_uint32(f"{arch}.vocab_size", n_vocab)
    w.add_uint32(f"{arch}.context_length", 2048)
    w.add_uint32(f"{arch}.embedding_length", n_embd)
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_uint32(f"{arch}.feed_forward_length", n_ff)
    w.add_uint32(f"{arch}.attention.head_count", n_head)
    w.add_uint32(f"{arch}.attention.head_count_kv", n_head_kv)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6 if arch == "gemma3" else 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_uint32(f"{arch}.rope.dimension_count", n_embd // n_head)
    if moe:
        w.add_uint32(f"{arch}.expert_count", n_expert)
        w.add_uint32(f"{arch}.expert_used_count", n_expert_used)
        w.add_uint32(f"{arch}.expert_feed_forward_length", n_ff)
    for key, value in ARCH_KV.get(arch, {}).items():
        w.add_float32(f"{arch}.{key}", value)
    for key, (vtype, value, sub) in tok_kv.items():
        w.add_key_value(key, value, vtype, sub_type=sub)

    types = [_storage_type(s, qtype) for s in specs]
    for s, t in zip(specs, types):
        w.add_tensor_info(s.name, s.ne[::-1], np.float32, _nbytes(s.ne, t), raw_dtype=t)
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        for s, t in zip(specs, types):
            w.write_tensor_data(_make_tensor(s, t, rng))
        w.close()
        tmp.replace(path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return path


def llama_dims_for_params(n_params: float, n_vocab: int, tied: bool = False) -> dict[str, int]:
    """Llama-shaped dims (``n_layer, n_embd, n_head, n_head_kv, n_ff``) with about ``n_params``
    parameters (within a few percent for ``n_params`` >= 1e8) for a vocabulary of ``n_vocab``.

    Head size 64, 4:1 grouped-query attention, ``n_ff`` = 8/3 ``n_embd`` rounded up to 256, and
    the ``n_embd`` (a multiple of 256) whose depth gives an aspect ratio ``n_embd/n_layer``
    closest to 64 at <= 1.5e9 parameters, growing to 128 at 7e9 and above, as in the Llama
    family (1.5e9: 2048 x 29 layers). Raises ValueError when ``n_params`` is too small to hold
    the embeddings plus one layer.
    """
    target = min(128.0, 64.0 * max(1.0, n_params / 1.5e9) ** 0.45)
    best = None
    for n_embd in range(256, 16385, 256):
        dims = _llama_dims(n_embd)
        rest = n_params - n_vocab * n_embd * (1 if tied else 2) - n_embd
        n_layer = round(rest / _llama_layer_params(**dims))
        if n_layer < 1:
            continue
        score = abs(math.log(n_embd / n_layer / target))
        if best is None or score < best[0]:
            best = (score, dict(dims, n_layer=n_layer))
    if best is None:
        raise ValueError(f"n_params={n_params:g} is too small for a llama with vocab {n_vocab}")
    return best[1]


def write_synthetic_llama_of_size(path: str | Path, n_params: float, *, tokenizer_from: str | Path,
                                  dtype: str = "q4_0", seed: int = 0, tied: bool = False) -> Path:
    """Write a random llama of about ``n_params`` parameters (e.g. ``1.5e9``; dims from
    :func:`llama_dims_for_params`) to ``path``. Memory stays near one tensor, quantized.
    Returns the path; raises as :func:`write_synthetic`."""
    n_vocab = len(_tokenizer_kv(Path(tokenizer_from))["tokenizer.ggml.tokens"][1])
    dims = llama_dims_for_params(n_params, n_vocab, tied)
    return write_synthetic(path, "llama", **dims, tokenizer_from=tokenizer_from, seed=seed,
                           dtype=dtype, tied=tied)


def _llama_dims(n_embd: int) -> dict[str, int]:
    n_head = n_embd // 64
    n_head_kv = n_head // 4  # n_embd is a multiple of 256, so n_head is a multiple of 4
    n_ff = -(-(8 * n_embd // 3) // 256) * 256
    return {"n_embd": n_embd, "n_head": n_head, "n_head_kv": n_head_kv, "n_ff": n_ff}


def _llama_layer_params(n_embd: int, n_head: int, n_head_kv: int, n_ff: int) -> int:
    kv = n_embd // n_head * n_head_kv
    return n_embd * (2 * n_embd + 2 * kv) + 3 * n_embd * n_ff + 2 * n_embd


def _tokenizer_kv(src: Path) -> dict[str, tuple]:
    """All ``tokenizer.*`` keys of the GGUF ``src`` as ``{key: (vtype, value, sub_type)}``, with
    strings kept as raw bytes so any vocabulary round-trips exactly. Cached per file version
    (parsing a 49k-token vocabulary takes seconds); callers must not mutate the result."""
    try:
        st = src.stat()
    except OSError as e:
        raise ModelError(f"cannot read tokenizer source {src}: {e}; pass a GGUF model file") from e
    return _tokenizer_kv_cached(str(src.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _tokenizer_kv_cached(src: str, _mtime_ns: int, _size: int) -> dict[str, tuple]:
    import gguf

    try:
        reader = gguf.GGUFReader(src)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read tokenizer source {src}: {e}; pass a GGUF model file") from e
    out: dict[str, tuple] = {}
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(f.parts[i]) for i in f.data]
            else:
                value = [f.parts[i].tolist()[0] for i in f.data]
            out[key] = (vtype, value, sub)
        elif vtype == gguf.GGUFValueType.STRING:
            out[key] = (vtype, bytes(f.parts[f.data[0]]), None)
        else:
            out[key] = (vtype, f.parts[f.data[0]].tolist()[0], None)
    if "tokenizer.ggml.tokens" not in out:
        raise ModelError(f"{src} has no tokenizer (tokenizer.ggml.tokens); pass a GGUF model "
                         "with an embedded tokenizer, e.g. the SmolLM2 one")
    return out


def _storage_type(spec: TensorSpec, qtype):
    import gguf

    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    if spec.kind != "weight":
        return F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if spec.ne[0] % block == 0 else F16


def _nbytes(ne: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(ne) // block * size


def _make_tensor(spec: TensorSpec, qtype, rng: np.random.Generator) -> np.ndarray:
    """The data of ``spec`` stored as ``qtype``: numpy shape ``ne[::-1]`` (F32/F16) or rows of
    quantized bytes, generated ``_CHUNK_ELEMS`` at a time."""
    import gguf

    if spec.kind == "norm":
        return np.ones(spec.ne[::-1], dtype=np.float32)
    row, n_rows = spec.ne[0], math.prod(spec.ne[1:])
    step = max(1, _CHUNK_ELEMS // row)
    parts = []
    for start in range(0, n_rows, step):
        x = rng.standard_normal((min(step, n_rows - start), row), dtype=np.float32)
        x *= BIAS_STD if spec.kind == "bias" else 1.0 / math.sqrt(row)
        parts.append(gguf.quants.quantize(x, qtype))
    data = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return data.reshape(*spec.ne[1:][::-1], data.shape[-1])


def parse_size(text: str) -> float:
    """Parameter count from ``"1.5B"``, ``"300M"``, ``"2e9"``. Raises ValueError naming the text."""
    t = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(t[-1:], 1.0)
    try:
        n = float(t[:-1] if t[-1:] in "KMBG" else t) * scale
    except ValueError:
        raise ValueError(f"model size {text!r}: write e.g. 1.5B or 300M") from None
    if n <= 0:
        raise ValueError(f"model size {text!r} must be positive")
    return n


def cached_synthetic_llama(size: str, dtype: str = "q4_0") -> Path:
    """A random-weight llama-shaped GGUF of about ``size`` parameters (``"1.5B"``), with the
    built-in SmolLM2 tokenizer, written once into ``cache_dir()/models/`` and reused. For
    benchmarks only: its text is noise. Raises ValueError for a bad or too small size."""
    from ..paths import cache_dir
    from .models import pull

    n = parse_size(size)
    path = cache_dir() / "models" / f"synthetic-llama-{n / 1e6:.0f}M-{dtype}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".writing")
        write_synthetic_llama_of_size(tmp, n, tokenizer_from=pull("smollm2", progress=False), dtype=dtype)
        # write_synthetic writes to <tmp>.partial and renames; move the finished file into place
        os.replace(tmp, path)
    return path
