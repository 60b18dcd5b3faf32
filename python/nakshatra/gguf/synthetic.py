"""Small random-weight GGUF models that the pinned llama.cpp loads and runs.

Used by tests (split-vs-unsplit equivalence for every supported architecture) and benchmarks
(a llama-shaped model of a chosen parameter count). The tokenizer, and with it the vocabulary
size, is copied from a real GGUF (``tokenizer_from``, e.g. SmolLM2) so prompts tokenize as usual.

Tensor names and shapes are not written down here: :func:`tensor_specs` asks the pinned llama.cpp,
loading metadata-only files until its loader for the architecture is satisfied. The metadata an
architecture needs beyond the common keys is :data:`ARCH_KV`. Shapes are in ggml order (``ne0``
first, the row length), the reverse of numpy's. Weights are drawn from
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
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError

ARCHS = ("llama", "qwen2", "qwen3", "phi3", "qwen3moe", "gemma3", "granite", "exaone", "xverse", "mistral3",
         "deepseek2", "glm4moe", "gemma2", "gemma", "smollm3", "gpt-oss", "command-r", "cohere2", "olmo2", "phi2",
         "starcoder2", "falcon", "ernie4_5", "qwen2moe", "olmoe", "stablelm", "internlm2", "glm4")
"""Architectures :func:`write_synthetic` can write."""

MOE_ARCHS = frozenset({"qwen3moe", "deepseek2", "glm4moe", "gpt-oss", "qwen2moe", "olmoe"})
"""Architectures whose FFN is a mixture of experts: ``n_expert``/``n_expert_used`` apply."""

ARCH_KV: dict[str, dict[str, int | float | bool | str | list]] = {
    # Granite's scales: the embedding scale multiplies token input on the first stage only (patch
    # 0002 keeps it off hidden-state input), the others act inside every layer and on the logits
    "granite": {"logit_scale": 0.5, "residual_scale": 0.75, "embedding_scale": 3.0, "attention_scale": 0.125},
    # multi-head latent attention: q and kv low-rank projections, 24-wide heads (16 without RoPE,
    # 8 with), 16-wide values; the KV cache holds the compressed kv (32) plus the RoPE part (8)
    # as one head shared by all. Layers 0-1 are dense, the rest mixture-of-experts with one
    # shared expert
    "deepseek2": {"attention.head_count_kv": 1, "attention.q_lora_rank": 32, "attention.kv_lora_rank": 32,
                  "attention.key_length_mla": 24, "attention.value_length_mla": 16, "attention.key_length": 40, "attention.value_length": 32,
                  "rope.dimension_count": 8, "expert_shared_count": 1, "leading_dense_block_count": 2,
                  "expert_weights_scale": 1.0},
    "glm4moe": {"leading_dense_block_count": 1, "expert_shared_count": 1, "expert_weights_scale": 1.0},
    # sliding window on every other layer (period 2, the loader's default)
    "gemma2": {"attention.sliding_window": 4, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gpt-oss": {"attention.sliding_window": 4},
    "cohere2": {"attention.sliding_window": 4, "logit_scale": 0.5},
    "command-r": {"logit_scale": 0.5},
    "qwen2moe": {"expert_shared_feed_forward_length": 128},
    "olmoe": {"attention.head_count_kv": 4},  # its q/k norms span all heads: no grouped-query attention
}
"""Metadata ``{arch}.{key}`` an architecture's loader requires or that changes its graph, beyond
the keys every architecture gets (:func:`_metadata`). Python ints are written as uint32, floats
as float32, lists as arrays of those."""

ARCH_OPTIONAL: dict[str, tuple[str, ...]] = {
    "qwen2": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "phi3": ("attn_qkv.weight",),  # fused q, k, v: the loader takes it or the three apart
}
"""Tensors (per-layer name suffixes) an architecture's loader accepts but does not require, and
that its real checkpoints carry: written too, so the graph computes them."""


DTYPES = ("f32", "f16", "q8_0", "q4_0")
"""Weight types for the matrices; norms, biases and the MoE router stay F32."""

BIAS_STD = 0.02
_CHUNK_ELEMS = 1 << 24  # float32 elements generated at once (64 MiB)
_PLACEHOLDER = (1,)     # the shape a tensor is first written with, before llama.cpp names the right one


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: ``name`` as llama.cpp expects it, ``ne`` its shape in ggml order,
    ``kind`` one of ``"weight"`` (random, stored as the chosen dtype), ``"norm"`` (ones, F32),
    ``"bias"`` (random, F32) or ``"router"`` (random, F32)."""

    name: str
    ne: tuple[int, ...]
    kind: str = "weight"


def tensor_kind(name: str, ne: tuple[int, ...]) -> str:
    """How a tensor of this name and shape is filled: norms (any name with ``norm``, and rope
    frequency factors) are ones, biases (``.bias``, and other 1-D tensors such as attention
    sinks) small random F32, MoE routers (``ffn_gate_inp``) random F32, the rest random weights."""
    if name.endswith(".bias"):
        return "bias"
    if "norm" in name or "rope_freqs" in name or "rope_factors" in name:
        return "norm"
    if "ffn_gate_inp" in name:
        return "router"
    return "bias" if len(ne) == 1 else "weight"


def tensor_specs(arch: str, *, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int,
                 n_vocab: int, n_expert: int = 0, n_expert_used: int = 0, tied: bool = False,
                 kv: dict | None = None, optional: tuple[str, ...] = ()) -> list[TensorSpec]:
    """The tensors a model of ``arch`` with these dimensions must hold, in the order llama.cpp's
    loader creates them, as **llama.cpp itself says**: a metadata-only file is written and
    loaded (``_nakshatra.probe_load``, nothing allocated) over and over; each load names the
    next tensor that is missing (``tensor 'X' not found``: added with a placeholder shape),
    the shape it wants (``wrong shape; expected [..]``: taken), or that written tensors went
    unused (``wrong number of tensors``: those it did not ask for are dropped), until the file
    loads. A tensor found in one layer is guessed for the later layers too, so a model takes
    about two loads per distinct tensor. Optional tensors are added only when real checkpoints
    carry them: ``output.weight`` unless ``tied``, :data:`ARCH_OPTIONAL`, and ``optional`` (full
    names or per-layer suffixes). ``kv``: metadata over :data:`ARCH_KV` (as :func:`write_synthetic`).

    Cached per argument set and metadata. Raises ValueError for an unknown ``arch`` and ModelError when
    llama.cpp refuses the metadata (naming the missing key) or the search does not settle.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown synthetic architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    meta = _metadata(arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                     n_vocab=n_vocab, n_expert=n_expert, n_expert_used=n_expert_used, kv=kv)
    key = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in meta.items())
    return list(_derive(arch, key, n_layer, tied, tuple(optional)))


@functools.lru_cache(maxsize=64)
def _derive(arch: str, meta_key: tuple, n_layer: int, tied: bool, optional: tuple[str, ...]) -> tuple[TensorSpec, ...]:
    import tempfile

    from .. import _nakshatra

    meta = {k: list(v) if isinstance(v, tuple) else v for k, v in meta_key}
    probe_kv = {"tokenizer.ggml.model": "none"}  # a vocabulary of vocab_size dummy tokens: fast to load
    shapes: dict[str, tuple[int, ...]] = {}   # name -> ne, in the order first asked for
    known: set[str] = set()                   # names whose shape llama.cpp confirmed or accepted
    wanted_optional = ([] if tied else ["output.weight"]) + list(ARCH_OPTIONAL.get(arch, ())) + list(optional)
    seen_errors: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="nak-probe-") as tmp:
        probe = Path(tmp) / "probe.gguf"
        # each load adds, shapes or drops at least one tensor; a bound in case llama.cpp never settles
        for _ in range(64 + 128 * n_layer):
            _write_gguf(probe, arch, meta, probe_kv, [TensorSpec(n, ne) for n, ne in shapes.items()], None, None)
            err, asked = _nakshatra.probe_load(str(probe))
            if not err:
                known.update(asked)
                extra = [n for n in _optional_names(wanted_optional, asked) if n not in shapes]
                if not extra:
                    break
                for name in extra:  # written with a placeholder shape: llama.cpp names the right one
                    shapes[name] = _PLACEHOLDER
                continue
            if err in seen_errors:
                raise ModelError(f"{arch}: deriving the tensors from llama.cpp did not settle: {err}")
            seen_errors.add(err)
            known.update(asked[:-1])  # every tensor created before the one that stopped it was accepted
            if m := _NOT_FOUND.search(err):
                _add_guessing_later_layers(shapes, m.group(1) or m.group(2), n_layer)
            elif m := _WRONG_SHAPE.search(err):
                ne = tuple(int(x) for x in m.group(2).split(","))
                _set_shape_and_later_guesses(shapes, known, m.group(1), ne, n_layer)
            elif _WRONG_COUNT.search(err):
                asked_set = set(asked)
                shapes = {n: ne for n, ne in shapes.items() if n in asked_set}
            elif m := _NO_KEY.search(err):
                raise ModelError(f"{arch}: llama.cpp needs the metadata key {m.group(1)}; add it to "
                                 "nakshatra.gguf.synthetic.ARCH_KV")
            else:
                raise ModelError(f"{arch}: llama.cpp refuses the synthetic metadata: {err}")
        else:
            raise ModelError(f"{arch}: deriving the tensors from llama.cpp did not settle")
    order: dict[str, int] = {}
    for i, name in enumerate([*asked, *shapes]):  # skipped tensors (next-n blocks) are not logged as asked
        order.setdefault(name, i)
    return tuple(TensorSpec(n, ne, tensor_kind(n, ne)) for n, ne in sorted(shapes.items(), key=lambda x: order[x[0]]))


_NOT_FOUND = re.compile(r"tensor '([^']+)' not found|missing tensor '([^']+)'")
_WRONG_SHAPE = re.compile(r"tensor '([^']+)' has wrong shape; expected ([\d, ]+), got")
_WRONG_COUNT = re.compile(r"wrong number of tensors")
_NO_KEY = re.compile(r"key not found in model: (\S+)")
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def _optional_names(wanted: list[str], asked: list[str]) -> list[str]:
    """The names llama.cpp asked for that match ``wanted`` (a full name such as
    ``output.weight``, or a per-layer suffix such as ``attn_q.bias``)."""
    out = []
    for name in asked:
        m = _LAYER.match(name)
        if name in wanted or (m and m.group(2) in wanted):
            out.append(name)
    return out


def _add_guessing_later_layers(shapes: dict[str, tuple[int, ...]], name: str, n_layer: int) -> None:
    shapes.setdefault(name, _PLACEHOLDER)
    m = _LAYER.match(name)
    if m:
        for j in range(int(m.group(1)) + 1, n_layer):
            shapes.setdefault(f"blk.{j}.{m.group(2)}", _PLACEHOLDER)


def _set_shape_and_later_guesses(shapes: dict[str, tuple[int, ...]], known: set[str], name: str,
                                 ne: tuple[int, ...], n_layer: int) -> None:
    shapes[name] = ne
    m = _LAYER.match(name)
    if m:
        for j in range(int(m.group(1)) + 1, n_layer):
            later = f"blk.{j}.{m.group(2)}"
            if later in shapes and later not in known:
                shapes[later] = ne


def _metadata(arch: str, *, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int,
              n_expert: int, n_expert_used: int, kv: dict | None = None) -> dict[str, int | float | bool | str | list]:
    """The architecture metadata of a synthetic model, ``{key: value}`` without the tokenizer:
    the keys every loader reads, both layer-norm epsilons (architectures read one or the
    other), the expert keys for a mixture of experts, then :data:`ARCH_KV`, then ``kv`` (a
    value of None removes the key)."""
    eps = 1e-6 if arch.startswith("gemma") else 1e-5
    out: dict[str, int | float | bool | str | list | None] = {
        "vocab_size": n_vocab, "context_length": 2048, "embedding_length": n_embd, "block_count": n_layer,
        "feed_forward_length": n_ff, "attention.head_count": n_head, "attention.head_count_kv": n_head_kv,
        "attention.layer_norm_rms_epsilon": eps, "attention.layer_norm_epsilon": eps,
        "rope.freq_base": 10000.0, "rope.dimension_count": n_embd // n_head,
    }
    if n_expert:
        out.update({"expert_count": n_expert, "expert_used_count": n_expert_used, "expert_feed_forward_length": n_ff})
    out.update(ARCH_KV.get(arch, {}))
    out.update(kv or {})
    return {f"{arch}.{k}": v for k, v in out.items() if v is not None}


def _write_gguf(path: Path, arch: str, meta: dict, extra_kv: dict, specs: list[TensorSpec], types, data) -> None:
    """Write a GGUF: ``general.*``, ``meta``, ``extra_kv`` (values as raw ``(vtype, value,
    sub_type)`` tuples or plain Python values), then ``specs``. With ``data`` None the tensor
    data is a sparse hole of the right size (for probing: llama.cpp checks that each tensor lies
    inside the file, and a no-alloc load reads none); otherwise ``data(spec, type)`` gives each
    tensor's array, stored as ``types[i]``."""
    import gguf

    F32 = gguf.GGMLQuantizationType.F32
    types = types or [F32] * len(specs)
    w = gguf.GGUFWriter(path, arch)
    try:
        # no arch in the name: llama.cpp applies Phi-3 tokenizer fixes to names containing "phi3"
        w.add_name("nakshatra-synthetic")
        for key, value in [*meta.items(), *extra_kv.items()]:
            if isinstance(value, tuple):
                vtype, v, sub = value
                w.add_key_value(key, v, vtype, sub_type=sub)
            else:
                _add_plain(w, key, value)
        for s, t in zip(specs, types):
            w.add_tensor_info(s.name, s.ne[::-1], np.float32, _nbytes(s.ne, t), raw_dtype=t)
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if data is None:
            w.close()
            pad = w.data_alignment
            total = sum(-(-_nbytes(s.ne, t) // pad) * pad for s, t in zip(specs, types))
            size = path.stat().st_size
            os.truncate(path, -(-size // pad) * pad + total + pad)
        else:
            for s, t in zip(specs, types):
                w.write_tensor_data(data(s, t))
    finally:
        w.close()


def _add_plain(w, key: str, value) -> None:
    import gguf

    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list):
        sub = gguf.GGUFValueType.FLOAT32 if any(isinstance(x, float) for x in value) else \
            gguf.GGUFValueType.BOOL if all(isinstance(x, bool) for x in value) else gguf.GGUFValueType.UINT32
        w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=sub)
    else:
        raise TypeError(f"metadata {key}: cannot write a {type(value).__name__}")


def write_synthetic(path: str | Path, arch: str, n_layer: int = 4, n_embd: int = 64, n_head: int = 4,
                    n_head_kv: int = 2, n_ff: int = 128, n_expert: int = 4, n_expert_used: int = 2, *,
                    tokenizer_from: str | Path, seed: int = 0, dtype: str = "f32",
                    tied: bool = False, kv: dict | None = None, optional: tuple[str, ...] = ()) -> Path:
    """Write a random-weight GGUF of ``arch`` to ``path`` (parent directories created; written
    to ``<path>.partial`` and renamed, so a failure leaves no file) and return the path. Its
    tensors are the ones llama.cpp asks for (:func:`tensor_specs`).

    ``n_embd`` must be divisible by ``n_head``, and ``n_head`` by ``n_head_kv``; head size is
    ``n_embd // n_head``. ``n_ff`` is the FFN width (for a mixture of experts,
    :data:`MOE_ARCHS`, the width of each of the ``n_expert`` experts, ``n_expert_used`` routed
    per token; the expert counts are ignored by dense architectures). For the quantized
    ``dtype``\\ s a matrix whose row length is not a multiple of 32 is stored as F16 instead, as
    llama-quantize does. ``kv``: metadata ``{key without the arch prefix: value}`` over
    :data:`ARCH_KV` (None removes a key), e.g. ``{"nextn_predict_layers": 1}``; ``optional``:
    optional tensors to write too (:func:`tensor_specs`).

    Raises ValueError for bad shapes, unknown ``arch`` or ``dtype``; ModelError when
    ``tokenizer_from`` is not a GGUF with a tokenizer, or llama.cpp refuses the metadata.
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
    moe = arch in MOE_ARCHS
    if moe and not 0 < n_expert_used <= n_expert:
        raise ValueError(f"need 0 < n_expert_used <= n_expert, got {n_expert_used} and {n_expert}")
    if not moe:
        n_expert = n_expert_used = 0

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok_kv = _tokenizer_kv(Path(tokenizer_from))
    n_vocab = len(tok_kv["tokenizer.ggml.tokens"][1])
    specs = tensor_specs(arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                         n_vocab=n_vocab, n_expert=n_expert, n_expert_used=n_expert_used, tied=tied, kv=kv,
                         optional=optional)
    meta = _metadata(arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                     n_vocab=n_vocab, n_expert=n_expert, n_expert_used=n_expert_used, kv=kv)

    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    ftype = gguf.LlamaFileType["ALL_F32" if dtype == "f32" else "MOSTLY_" + dtype.upper()]
    general: dict = {"general.file_type": int(ftype)}
    if dtype.startswith("q"):
        general["general.quantization_version"] = gguf.GGML_QUANT_VERSION
    types = [_storage_type(s, qtype) for s in specs]
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".partial")
    try:
        _write_gguf(tmp, arch, {**general, **meta}, tok_kv, specs, types, lambda s, t: _make_tensor(s, t, rng))
        tmp.replace(path)
    finally:
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
