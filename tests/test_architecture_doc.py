"""docs/architecture.md names files and symbols (`path` and `path: symbol` in backticks): each
must exist, so the page cannot silently go stale when code is renamed or moved.

No model, no build: it reads the page and the source files as text.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
MIN_SYMBOLS = 20

FIX = "update docs/architecture.md (or restore the code it names)"

# `path` or `path: symbol`; a path has a slash and its file name an extension (cpp/stage/stage.cpp,
# patches/README.md), so `nakshatra.layer_range_start/end` or `[n_tokens, n_embd]` are not paths
_REF = re.compile(r"^(?P<path>[\w.\-]+(?:/[\w.\-]+)*/[\w\-][\w.\-]*\.\w+)"
                  r"(?:: (?P<symbol>[A-Za-z_]\w*(?:(?:::|\.)[A-Za-z_]\w*)*))?$")
# what looks like a reference but is not in that form (a bad separator, a bare qualified name)
_LOOKS_LIKE_REF = re.compile(r"^[\w.\-/]+\.(?:py|cpp|h|patch|md|toml)\s*:|^(?:[A-Z]\w*\.|\w+::)\w+$")
_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _refs(text: str) -> tuple[list[tuple[str, str | None]], list[str]]:
    """(path, symbol or None) of every reference, and the spans that look like malformed ones."""
    refs, bad = [], []
    for span in _SPAN.findall(text):
        m = _REF.match(span)
        if m:
            refs.append((m["path"], m["symbol"]))
        elif _LOOKS_LIKE_REF.search(span):
            bad.append(span)
    return refs, bad


def _source(path: Path) -> str:
    """The file's text; for a patch, the code it adds or keeps, without the diff marks."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in (".patch", ".diff"):
        text = "\n".join(ln[1:] if ln[:1] in ("+", " ") and not ln.startswith("+++") else ln
                          for ln in text.splitlines() if not (ln.startswith("-") and not ln.startswith("---")))
    return text


def _block(text: str, name: str, python: bool) -> str | None:
    """The body of `class name` (Python: its indented lines) or `struct|class name {...}` (C++)."""
    if python:
        m = re.search(rf"^class {re.escape(name)}\b.*$", text, re.M)
        if not m:
            return None
        body = []
        for line in text[m.end():].splitlines()[1:]:
            if line.strip() and not line[0].isspace() and not line.startswith("#"):
                break
            body.append(line)
        return "\n".join(body)
    m = re.search(rf"\b(?:struct|class)\s+{re.escape(name)}\b[^;{{]*\{{", text)
    if not m:
        return None
    depth, i = 1, m.end()
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[m.end():i]


def _defines(text: str, symbol: str, python: bool) -> bool:
    """Whether ``text`` holds a definition-ish occurrence of ``symbol``."""
    parts = re.split(r"::|\.", symbol)
    if len(parts) > 1:
        owner, member = parts[-2], parts[-1]
        m = re.escape(member)
        if python:
            body = _block(text, owner, True)
            return body is not None and re.search(rf"^\s+(?:async\s+)?def {m}\b", body, re.M) is not None
        if re.search(rf"\b{re.escape(owner)}::{m}\s*\(", text):  # C++ out-of-class definition
            return True
        body = _block(text, owner, False)  # or a member declared in the struct/class
        return body is not None and re.search(rf"\b{m}\s*(?:\(|=|;|\[|\{{)", body) is not None
    n = re.escape(symbol)
    if python:
        patterns = [
            rf"^\s*(?:async\s+)?def {n}\b",                 # function or method
            rf"^\s*class {n}\b",                             # class
            rf"^{n}\s*(?::[^=\n]*)?=(?!=)",                  # module-level constant
        ]
    else:
        patterns = [
            rf"\b(?:struct|class|enum|union)\s+{n}\b",      # type
            rf"^[ \t]*#[ \t]*define[ \t]+{n}\b",            # macro
            rf"^(?:[A-Za-z_][\w:<>,* \t&]*[* \t&])?{n}[ \t]*\(",  # function at file scope (not a call)
        ]
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", symbol):
            patterns.append(rf"^[ \t]+{n}[ \t]*=")              # enumerator
    return any(re.search(p, text, re.M) for p in patterns)


def check_doc(text: str) -> tuple[list[str], int]:
    """Problems with the references in ``text`` (empty: all good) and the number of symbols."""
    refs, bad = _refs(text)
    problems = [f"`{s}` is not of the form `path` or `path: symbol` (path from the repo root, "
                f"colon, one space, symbol); {FIX}" for s in bad]
    for path, symbol in refs:
        f = ROOT / path
        if not f.exists():
            problems.append(f"`{path}` does not exist; {FIX}")
        elif symbol is not None and (not f.is_file() or not _defines(_source(f), symbol, f.suffix == ".py")):
            problems.append(f"`{path}: {symbol}`: no definition of {symbol} in {path}; {FIX}")
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:|^#", target):
            continue
        if not (DOC.parent / target.split("#")[0]).exists():
            problems.append(f"link ({target}) points at nothing; {FIX}")
    return problems, sum(1 for _, s in refs if s)


def test_every_reference_exists():
    problems, n_symbols = check_doc(DOC.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)
    assert n_symbols >= MIN_SYMBOLS, (f"docs/architecture.md names {n_symbols} symbols, fewer than "
                                      f"{MIN_SYMBOLS}: name the code as `path: symbol`")


def test_the_check_catches_a_stale_reference():
    text = ("`cpp/stage/executor.cpp: nak_stage::run_steps` `python/nakshatra/client/chain.py: Session.feed` "
            "`cpp/stage/stage.cpp: nak_stage::no_such_method` `python/nakshatra/client/chain.py: Session.no_such` "
            "`python/nakshatra/no_such_file.py` `cpp/stage/stage.cpp:nak_stage::load` `Session.feed`")
    problems, n_symbols = check_doc(text)
    assert n_symbols == 4
    joined = "\n".join(problems)
    for stale in ("nak_stage::no_such_method", "Session.no_such", "no_such_file.py",
                  "cpp/stage/stage.cpp:nak_stage::load", "`Session.feed`"):
        assert stale in joined, joined
    assert "nak_stage::run_steps" not in joined and "python/nakshatra/client/chain.py: Session.feed`" not in joined
    assert len(problems) == 5
