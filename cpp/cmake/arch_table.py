"""Read the pinned llama.cpp source and write, for every architecture it names, the facts that decide
whether a model of it can be cut by layer ranges: which graph builder it uses, whether that builder
names its layer outputs ``l_out`` (where a slice without the output layer ends, patch 0002), whether
its memory is recurrent or hybrid, and what it does to its input between the token embedding and the
first layer (a transform there would be applied again to a hidden state on a later stage).

Run at build time (cpp/cmake/llama.cmake) on the patched tree; the JSON is installed as
``nakshatra/_arch_table.json`` and read by :mod:`nakshatra.gguf.archs`. Facts only: the verdict
(split, refused and why) is made in Python.

    python cpp/cmake/arch_table.py --source SRC --out FILE

Sources read (paths relative to the llama.cpp tree):
- ``src/llama-arch.cpp``: ``{ LLM_ARCH_X, "name" }`` and ``llm_arch_is_recurrent/hybrid/diffusion``;
- ``src/llama-model.cpp``: the factory ``case LLM_ARCH_X: return new llama_model_y(params);``;
- ``src/models/models.h``: ``struct llama_model_y : public llama_model_z`` and
  ``using graph = llama_model_z::graph;`` (a builder shared with another class);
- ``src/models/*.cpp``: each builder's constructor ``llama_model_z::graph[<..>]::graph(...)`` and
  the other members of that graph struct defined in the same file; each model's
  ``load_arch_hparams`` (its default sliding-window period, decisions by the layer count).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

_ARCH_NAME = re.compile(r'\{\s*(LLM_ARCH_\w+)\s*,\s*"([^"]+)"\s*\}')
_FACTORY_RETURN = re.compile(r"return\s+new\s+(llama_model_\w+)\s*(?:<[^>]*>)?\s*\(")
_STRUCT = re.compile(r"struct\s+(llama_model_\w+)\s*(?:final\s*)?:\s*public\s+(llama_model_\w+)")
_USING_GRAPH = re.compile(r"using\s+graph\s*=\s*(llama_model_\w+)::graph")
_GRAPH_CTOR = re.compile(r"(llama_model_\w+)::graph(?:\s*<[^>]*>)?::graph\s*\(")
_LAYER_LOOP = re.compile(r"for\s*\(\s*int\s+il\s*=")
_REASSIGN = re.compile(r"\b(\w+)\s*=\s*(ggml_\w+|build_\w+)\s*\(")
# the layer index in arithmetic or a comparison: on a slice `il` is the local index
_INDEX_USE = re.compile(r"\(il\s*[-+%*/]|\bil\s*[-+%*/]\s*[\w(]|\bil\s*[<>]=?|[<>]=?\s*\(?\s*(?:\(\w+\)\s*)?il\b|"
                        r"\)\s*il\s*[<>%]|\bil\s*!=|\bil\s*==(?!\s*n_layer\s*-\s*1\b)")
_LOOP_HEADER = re.compile(r"for\s*\(\s*(?:int|uint32_t)\s+il\s*=")
_LOADER = re.compile(r"(llama_model_\w+)::load_arch_hparams\s*\(")
_SWA_PATTERN = re.compile(r"load_swa_pattern\s*\(\s*ml\s*,\s*(\d+)\s*(?:,\s*(true|false))?\s*\)")
_N_LAYER_CALL = re.compile(r"\bn_layer\(\)")
_EMBD_ABORT = re.compile(r"if\s*\(([^{;]*\bubatch\.embd\b[^{;]*)\)\s*\{[^{}]*GGML_ABORT")


def _switch_cases(text: str, func: str) -> set[str]:
    """The LLM_ARCH_ cases of ``bool func(const llm_arch & arch) { switch ... return true; }``."""
    m = re.search(r"bool\s+" + func + r"\s*\([^)]*\)\s*\{", text)
    if not m:
        return set()
    body = _block(text, m.end() - 1)
    true_part = body.split("return true;")[0]
    return set(re.findall(r"case\s+(LLM_ARCH_\w+)\s*:", true_part))


def _block(text: str, open_brace: int) -> str:
    """The text from ``text[open_brace] == '{'`` to its matching ``}`` (comments and strings are
    not parsed: the sources read here have balanced braces in both)."""
    depth = 0
    for i in range(open_brace, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace:i + 1]
    raise ValueError("unbalanced braces")


def _factory(text: str) -> dict[str, str]:
    """LLM_ARCH_X -> the llama_model_ class the factory creates for it."""
    m = re.search(r"case\s+LLM_ARCH_\w+\s*:\s*return\s+new\s+llama_model_", text)
    if not m:
        raise ValueError("no model factory (case LLM_ARCH_X: return new llama_model_...) in llama-model.cpp")
    start = text.rfind("switch", 0, m.start())
    body = _block(text, text.index("{", start))
    out: dict[str, str] = {}
    pending: list[str] = []
    for tok in re.finditer(r"case\s+(LLM_ARCH_\w+)\s*:|" + _FACTORY_RETURN.pattern, body):
        if tok.group(1):
            pending.append(tok.group(1))
        else:
            for arch in pending:
                out[arch] = tok.group(2)
            pending = []
    return out


def _graph_owners(models_h: str) -> dict[str, str]:
    """llama_model_y -> the class whose ``graph`` y builds with (y itself unless it says
    ``using graph = z::graph`` or inherits from a model class that does)."""
    parent: dict[str, str] = {}
    using: dict[str, str] = {}
    for m in _STRUCT.finditer(models_h):
        cls, base = m.group(1), m.group(2)
        parent[cls] = base
        brace = models_h.index("{", m.end())
        body = _block(models_h, brace)
        u = _USING_GRAPH.search(body)
        if u:
            using[cls] = u.group(1)
        elif re.search(r"\bstruct\s+graph\b", body):
            using[cls] = cls

    def owner(cls: str, seen: tuple[str, ...] = ()) -> str:
        if cls in seen:
            return cls
        if cls in using and using[cls] != cls:
            return owner(using[cls], seen + (cls,))
        if cls in using:
            return cls
        base = parent.get(cls, "")
        if base and base not in ("llama_model_base",):
            return owner(base, seen + (cls,))
        return cls

    return {cls: owner(cls) for cls in parent}


def _strip_comments(text: str) -> str:
    """C++ source without its // and /* */ comments (a comment naming "l_out" or an op does not
    count; string literals in builders hold no "//")."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _builders(models_dir: Path) -> dict[str, dict]:
    """graph owner class -> {"file", "ctor": constructor body, "members": the bodies of every
    function of that graph struct in the same file}."""
    out: dict[str, dict] = {}
    for f in sorted(models_dir.glob("*.cpp")):
        text = _strip_comments(f.read_text(errors="replace"))
        for m in _GRAPH_CTOR.finditer(text):
            cls = m.group(1)
            brace = text.index("{", m.end())
            ctor = _block(text, brace)
            members = []
            for mm in re.finditer(re.escape(cls) + r"::graph(?:\s*<[^>]*>)?::(\w+)\s*\(", text):
                if mm.group(1) == "graph":
                    continue
                members.append(_block(text, text.index("{", mm.end())))
            entry = out.setdefault(cls, {"file": f"src/models/{f.name}", "ctor": "", "members": []})
            entry["ctor"] += ctor
            entry["members"] += members
    return out


def _input_transforms(ctor: str) -> list[dict]:
    """What a builder does to its input between ``build_inp_embd`` and its layer loop: each
    statement that reassigns the embedding's variable through a ggml op or a build_ helper, with
    ``tokens_only`` true when it is conditional on ``ubatch.token`` (token input only)."""
    m = re.search(r"(\w+)\s*=\s*build_inp_embd\s*\(", ctor)
    if not m:
        return []
    var = m.group(1)
    loop = _LAYER_LOOP.search(ctor, m.end())
    region = ctor[m.end():loop.start() if loop else len(ctor)]
    out = []
    for stmt in region.split(";"):
        r = _REASSIGN.search(stmt)
        if not r or r.group(1) != var or not re.search(r"\b" + var + r"\b", stmt[r.end():]):
            continue
        text = " ".join(stmt.split())
        out.append({"op": r.group(2), "statement": text[:160], "tokens_only": "ubatch.token" in text})
    return out


def _layer_index_uses(code: str) -> list[str]:
    """The lines of builder code that compute with the layer index ``il`` (arithmetic, a
    comparison other than ``il == n_layer - 1``), loop headers excepted: on a slice ``il`` counts
    from the slice's first layer, so such a line may decide with the wrong layer (leading dense
    layers, every Nth layer without RoPE, MoE every Nth layer)."""
    out = []
    for line in code.splitlines():
        s = " ".join(line.split())
        # nak_layer_start: made global by patch 0002
        if "il" in s and _INDEX_USE.search(s) and not _LOOP_HEADER.search(s) and "nak_layer_start" not in s \
                and s not in out:
            out.append(s[:160])
    return out


def _loaders(models_dir: Path) -> dict[str, str]:
    """llama_model_y -> the body of its ``load_arch_hparams`` (where the loader reads metadata)."""
    out: dict[str, str] = {}
    for f in sorted(models_dir.glob("*.cpp")):
        text = _strip_comments(f.read_text(errors="replace"))
        for m in _LOADER.finditer(text):
            out[m.group(1)] = _block(text, text.index("{", m.end()))
    return out


def _parents(models_h: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in _STRUCT.finditer(models_h)}


def _loader_of(cls: str, loaders: dict[str, str], parents: dict[str, str]) -> str:
    """The ``load_arch_hparams`` body ``cls`` runs: its own or its nearest base class's."""
    seen = set()
    while cls and cls not in seen:
        if cls in loaders:
            return loaders[cls]
        seen.add(cls)
        cls = parents.get(cls, "")
    return ""


def _swa_pattern(loader: str) -> dict | None:
    """The default sliding-window period the loader assumes when a file declares none
    (``load_swa_pattern(ml, N[, dense_first])``: an explicit per-layer array in the file wins),
    as {"period": N, "dense_first": bool}; None when it reads no pattern."""
    m = _SWA_PATTERN.search(loader)
    if not m:
        return None
    return {"period": int(m.group(1)), "dense_first": m.group(2) == "true"}


def _size_uses(loader: str, builder: str) -> list[str]:
    """Statements where the loader decides by the model's layer count (``hparams.n_layer()``),
    which a slice declares as its own: a comparison or condition on it, or a ``switch`` on it
    whose model type is then compared (the type name alone changes nothing). Array sizes and
    loops, and counts taken from ``nak_n_layer_full`` (patched), are not uses."""
    out = []
    type_decides = bool(re.search(r"\btype\s*[!=]=|switch\s*\(\s*(?:model\.)?type\b", loader + builder))
    for line in loader.splitlines():
        s = " ".join(line.split())
        if not _N_LAYER_CALL.search(s) or "nak_n_layer_full" in s or s.startswith("for ") \
                or "get_key_or_arr" in s or "get_arr" in s or "set_swa_pattern" in s:
            continue
        if s.startswith("switch") and not type_decides:
            continue
        if re.search(r"n_layer\(\)\s*[<>!=]=?|[<>!=]=?\s*hparams\.n_layer\(\)|^switch|^if\b|\?", s):
            out.append(s[:160])
    return out


def _embd_aborts(code: str) -> list[str]:
    """The conditions under which a builder aborts on embedding (hidden-state) input, unless they
    exempt a slice's hidden-state input (``nak_no_input``, patch 0002)."""
    return [" ".join(m.group(1).split()) for m in _EMBD_ABORT.finditer(code) if "nak_no_input" not in m.group(1)]


def arch_table(src: Path) -> dict:
    """The facts of every architecture in the llama.cpp tree at ``src`` (see the module)."""
    arch_cpp = (src / "src" / "llama-arch.cpp").read_text(errors="replace")
    model_cpp = (src / "src" / "llama-model.cpp").read_text(errors="replace")
    models_h = (src / "src" / "models" / "models.h").read_text(errors="replace")
    names = dict(_ARCH_NAME.findall(arch_cpp))
    recurrent = _switch_cases(arch_cpp, "llm_arch_is_recurrent")
    hybrid = _switch_cases(arch_cpp, "llm_arch_is_hybrid")
    diffusion = _switch_cases(arch_cpp, "llm_arch_is_diffusion")
    factory = _factory(model_cpp)
    owners = _graph_owners(models_h)
    builders = _builders(src / "src" / "models")
    loaders = _loaders(src / "src" / "models")
    parents = _parents(models_h)
    archs = {}
    for enum, name in sorted(names.items(), key=lambda kv: kv[1]):
        cls = factory.get(enum)
        owner = owners.get(cls, cls) if cls else None
        b = builders.get(owner) if owner else None
        body = (b["ctor"] + "".join(b["members"])) if b else ""
        loader = _loader_of(cls, loaders, parents) if cls else ""
        archs[name] = {
            "enum": enum,
            "model_class": cls,
            "builder": owner if b else None,
            "file": b["file"] if b else None,
            "names_l_out": '"l_out"' in body,
            "recurrent": enum in recurrent,
            "hybrid": enum in hybrid,
            "diffusion": enum in diffusion,
            "input_transforms": _input_transforms(b["ctor"]) if b else [],
            "layer_index_uses": _layer_index_uses(body),
            "embd_aborts": _embd_aborts(body),
            # a builder that builds only a sliding-window cache input asserts a sliding layer
            "swa_required": "build_attn_inp_kv_iswa" in body and not re.search(r"build_attn_inp_kv\s*\(", body),
            "swa_pattern": _swa_pattern(loader),
            "size_uses": _size_uses(loader, body),
        }
    return {"source": str(src), "archs": archs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, required=True, help="the (patched) llama.cpp tree")
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    a = ap.parse_args(argv)
    try:
        table = arch_table(a.source)
    except (OSError, ValueError) as e:
        print(f"arch_table.py: cannot read the architectures of {a.source}: {e}", file=sys.stderr)
        return 1
    a.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
