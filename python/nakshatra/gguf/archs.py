"""Which architectures can be cut by layer ranges, and why not the others.

The facts come from the pinned llama.cpp itself: at build time ``cpp/cmake/arch_table.py`` reads
the patched tree (each architecture's graph builder, whether it names its layer outputs ``l_out``,
its memory kind, what it does to its input before the first layer) into ``_arch_table.json``
beside the compiled extension. :func:`split_support` turns them into a verdict, in this order:

1. llama.cpp must know the architecture and have a graph builder for it;
2. recurrent and hybrid memory (Mamba, RWKV, Jamba, Qwen3-Next, ...) is refused: a stage keeps
   a KV cache of positions per session, and its rollback (speculative decoding, the prompt cache),
   failover replay and batching are built on that; diffusion models do not decode token by token;
3. the builder must name each layer's output ``l_out``: that is where a slice without the output
   layer ends (patch 0002, ``llm_graph_context::cb``);
4. nothing may transform the input between the token embedding and the first layer unless only
   for token input (``ubatch.token``): a later stage would apply it again to a hidden state
   (Gemma and Gemma 2 scale by ``sqrt(n_embd)``, BLOOM normalises, GPT-2 adds position embeddings);
5. a builder that aborts on embedding input (``if (ubatch.embd ...) GGML_ABORT``) cannot run a
   later stage, which takes hidden states: patch 0002 exempts slices in glm4 and glm4moe;
6. a builder that computes with the layer index ``il`` (every Nth layer without RoPE or with
   MoE) would see the slice's local index: refused until handled, unless verified (Granite's
   ``il > 0`` only matters for deepstack inputs). Handled: ``il < n_layer_dense_lead`` (leading
   dense layers of MoE models: the slicer rebases ``leading_dense_block_count`` on each slice)
   and indices patch 0002 makes global (``il + hparams.nak_layer_start``: SmolLM3);
7. a loader that tells the model's variant by its layer count (``hparams.n_layer()``, which on a
   slice is the slice's) in a way that changes the computation is refused until patched to use
   the whole model's (``nak_n_layer_full``: Gemma 2 and 3, DeepSeek V2);
8. the architecture must be in :data:`VERIFIED`: a split of it was checked bit-exact against the
   unsplit model (``tests/test_chain.py: test_exact_synthetic_arch``); the others may hide a trap
   the rules above do not see (a per-layer pattern set by the loader, a model size read from the
   layer count) that would give a silently wrong answer, so they are refused until tested.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import NakError, SliceError

VERIFIED = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma3", "phi3", "granite", "exaone", "xverse", "mistral3",
            "deepseek2", "glm4moe", "gemma2", "gemma", "smollm3", "gpt-oss", "command-r", "cohere2", "olmo2", "phi2",
            "starcoder2", "falcon", "ernie4_5", "qwen2moe", "olmoe", "stablelm", "internlm2", "glm4")
"""Architectures whose splits are tested bit-exact against the unsplit model: the tests' list,
``SYNTHETIC`` in tests/test_chain.py (a random-weight model of each, its tensors as llama.cpp asks
for them, cut in 2-3 uneven stages with a cut on every trap; a test checks both lists hold the
same architectures)."""


@dataclass(frozen=True)
class SplitSupport:
    """Whether models of ``arch`` can be cut by layer ranges: ``ok``, else ``reason`` (one
    sentence naming what llama.cpp does that prevents it)."""

    arch: str
    ok: bool
    reason: str = ""


@functools.lru_cache(maxsize=1)
def arch_table() -> dict[str, dict]:
    """Architecture name -> the facts ``cpp/cmake/arch_table.py`` read from the pinned llama.cpp.
    Raises NakError when the package was installed without the table (reinstall it)."""
    path = Path(__file__).resolve().parents[1] / "_arch_table.json"
    try:
        return json.loads(path.read_text())["archs"]
    except (OSError, ValueError, KeyError) as e:
        raise NakError(f"{path} is missing or unreadable ({e}); reinstall nakshatra (pip install .)") from None


def split_support(arch: str) -> SplitSupport:
    """The verdict for ``arch`` (see the module for the rules, in order)."""
    facts = arch_table().get(arch)
    if facts is None or not facts.get("builder"):
        return SplitSupport(arch, False, f"the pinned llama.cpp has no graph builder for architecture {arch!r}")
    if facts["recurrent"] or facts["hybrid"]:
        kind = "recurrent" if facts["recurrent"] else "hybrid (attention and recurrent)"
        return SplitSupport(arch, False, f"{arch} keeps {kind} state per sequence, and a stage keeps only a KV cache "
                                         "of positions per session (its rollback, failover replay and batching "
                                         "are built on it)")
    if facts["diffusion"]:
        return SplitSupport(arch, False, f"{arch} is a diffusion model: it does not decode token by token")
    if not facts["names_l_out"]:
        return SplitSupport(arch, False, f"its graph builder ({facts['file']}) does not name its layer outputs "
                                         "'l_out', where a slice without the output layer hands its hidden state on")
    for t in facts["input_transforms"]:
        if not t["tokens_only"]:
            return SplitSupport(arch, False, f"its graph builder ({facts['file']}) transforms the input before the "
                                             f"first layer ({t['statement']}), which a later stage would apply again "
                                             "to the hidden state it receives")
    if facts.get("embd_aborts"):
        return SplitSupport(arch, False, f"its graph builder ({facts['file']}) aborts on hidden-state input "
                                         f"(if ({facts['embd_aborts'][0]})), which every stage after the first gets")
    uses = unhandled_index_uses(facts)
    if uses and arch not in VERIFIED:
        return SplitSupport(arch, False, f"its graph builder ({facts['file']}) computes with the layer index "
                                         f"({uses[0]}), which on a slice counts from the slice's first layer; "
                                         "not yet handled")
    size = facts.get("size_uses", [])
    if size:
        return SplitSupport(arch, False, f"its loader tells the model's variant by its layer count ({size[0]}), "
                                         "which a slice declares as its own")
    if arch not in VERIFIED:
        return SplitSupport(arch, False, f"a split of {arch} is not yet verified bit-exact against the unsplit model "
                                         "(docs/architectures.md lists the verified architectures)")
    return SplitSupport(arch, True)


# `il < n_layer_dense_lead` (any casts): true on the same layers of a slice, whose
# leading_dense_block_count the slicer rebases
_DENSE_LEAD = re.compile(r"(?:static_cast<\w+>\s*\(\s*il\s*\)|\(\s*\w+\s*\)\s*il|\bil)\s*(?:<|>=)\s*"
                         r"(?:\(\s*\w+\s*\)\s*)?hparams\.n_layer_dense_lead")
_IL_USE = re.compile(r"\bil\s*[-+%*/<>!=]|[-+%*/<>]=?\s*\(?\s*il\b|\(il\s*[-+%*/]")


def unhandled_index_uses(facts: dict) -> list[str]:
    """The builder lines that compute with the layer index in a way no slice handles: every
    ``layer_index_uses`` line except leading-dense tests (rebased by the slicer)."""
    return [u for u in facts.get("layer_index_uses", []) if _IL_USE.search(_DENSE_LEAD.sub("", u))]


def require_splittable(arch: str, path: Path | str) -> None:
    """Raise SliceError naming ``path`` and the reason when models of ``arch`` cannot be split."""
    s = split_support(arch)
    if not s.ok:
        raise SliceError(f"{path}: a model of architecture {arch!r} cannot be split by layer ranges: {s.reason}")


def markdown() -> str:
    """docs/architectures.md: every architecture of the pinned llama.cpp, whether ``nak slice``
    cuts it, and if not why (what ``python -m nakshatra.gguf.archs --markdown`` prints)."""
    table = arch_table()
    verdicts = [split_support(a) for a in sorted(table) if table[a].get("builder")]
    ok = [v for v in verdicts if v.ok]
    lines = [
        "# Architectures",
        "",
        "Which architectures of the pinned llama.cpp `nak slice` cuts by layer ranges, and why not the",
        "others. Generated from the tests' list (`SYNTHETIC` in `tests/test_chain.py`, the same set as",
        "`VERIFIED` in `python/nakshatra/gguf/archs.py`) and the",
        "facts `cpp/cmake/arch_table.py` reads from the patched llama.cpp source; regenerate with",
        "`python -m nakshatra.gguf.archs --markdown > docs/architectures.md` (`tests/test_archs.py` checks",
        "it is current). The rules, in order, are in `python/nakshatra/gguf/archs.py`.",
        "",
        f"{len(ok)} of {len(verdicts)} architectures are split and tested bit-exact: {', '.join(v.arch for v in ok)}.",
        "",
        "| architecture | split | why not |",
        "| --- | --- | --- |",
    ]
    for v in verdicts:
        reason = v.reason.replace("|", r"\|")  # a pipe inside a table cell
        lines.append(f"| `{v.arch}` | {'yes, tested' if v.ok else 'no'} | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m nakshatra.gguf.archs [--markdown | ARCH ...]``: the verdict for each ARCH, or the
    docs page. Returns 1 when an ARCH cannot be split."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nakshatra.gguf.archs", description=__doc__.splitlines()[0])
    ap.add_argument("archs", nargs="*", help="architecture names (general.architecture)")
    ap.add_argument("--markdown", action="store_true", help="print docs/architectures.md")
    a = ap.parse_args(argv)
    if a.markdown:
        print(markdown(), end="")
        return 0
    bad = 0
    for arch in a.archs:
        s = split_support(arch)
        print(f"{arch}: " + ("can be split" if s.ok else f"cannot be split: {s.reason}"))
        bad |= not s.ok
    return int(bad)


if __name__ == "__main__":
    import sys

    sys.exit(main())
