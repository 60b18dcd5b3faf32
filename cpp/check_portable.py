#!/usr/bin/env python3
"""Flag Linux-only names in our C++ outside cpp/platform/, so the stages keep building on macOS.

    python3 cpp/check_portable.py            # scans cpp/ (this script's folder); exit 1 on findings
    python3 cpp/check_portable.py --root DIR # another tree (the tests use this)

Each finding prints ``path:line: NAME: use HELPER``. tests/test_portable.py runs it and fails on
any finding.

What is scanned: C, C++ and Objective-C sources and headers (.c .cc .cpp .cxx .h .hh .hpp .inl
.m .mm) under the root, except the root's ``platform/`` folder: cpp/platform/platform.cpp is where
such names belong, each behind ``#if defined(__linux__)`` / ``#elif defined(__APPLE__)`` with a
generic POSIX branch.

The rule:

* **Comments are not checked.** A comment may name ``accept4`` to say why a helper exists; only
  code can break a build. ``//`` and ``/* */`` comments are blanked before matching (a ``//`` or
  ``/*`` inside a string or character literal does not start a comment).
* **String literals are checked**: ``fopen("/proc/meminfo", "r")`` is exactly what must not
  appear outside cpp/platform/.
* **Identifiers match whole**: ``accept4`` is flagged, ``my_accept4`` is not. ``#include``
  lines are code (``<sys/epoll.h>``, ``<linux/...>`` are flagged).
* ``#if defined(__linux__)`` blocks outside cpp/platform/ are flagged too (no exemption): a
  platform branch belongs in cpp/platform/, where the next port finds every one of them.
* A page size written as a literal cannot be recognised in general; ``* 4096`` and ``4096 *``
  (with any spacing) are flagged, as a multiplication by 4096 is almost always pages to bytes
  (Apple silicon has 16 KiB pages): use sysconf(_SC_PAGESIZE) or a helper.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

SOURCE_SUFFIXES = {".c", ".cc", ".cpp", ".cxx", ".h", ".hh", ".hpp", ".inl", ".m", ".mm"}

_H = "(cpp/platform/platform.h)"
_HELPER_DIR = "a helper in cpp/platform/ behind #if defined(__linux__), with a macOS and a POSIX branch"

# (what to report, regular expression matched against comment-free code, what to use instead)
RULES: list[tuple[str, re.Pattern[str], str]] = [
    (name, re.compile(rx), use) for name, rx, use in [
        ("accept4", r"\baccept4\b", f"nak_accept(listen_fd) {_H}"),
        ("SOCK_NONBLOCK", r"\bSOCK_NONBLOCK\b",
         f"nak_accept {_H}, or nak_set_nonblocking (cpp/protocol/net.h) after nak_socket"),
        ("SOCK_CLOEXEC", r"\bSOCK_CLOEXEC\b", f"nak_socket(family, type, protocol) or nak_accept {_H}"),
        ("MSG_NOSIGNAL", r"\bMSG_NOSIGNAL\b", f"nak_send_nosignal(fd, data, n, dontwait) {_H}"),
        ("_SC_AVPHYS_PAGES", r"\b_SC_AVPHYS_PAGES\b", f"nak_mem_available_bytes() {_H}"),
        ("_SC_PHYS_PAGES", r"\b_SC_PHYS_PAGES\b", f"nak_mem_available_bytes() {_H}, or {_HELPER_DIR}"),
        ("/proc/", r"/proc/", f"nak_rss_bytes() / nak_mem_available_bytes() {_H}, or {_HELPER_DIR}"),
        ("/sys/", r"/sys/", _HELPER_DIR),
        ("epoll", r"\bepoll", "poll() (as cpp/stage/server.cpp)"),
        ("eventfd", r"\beventfd", "a pipe() or socketpair() to wake poll()"),
        ("sysinfo(", r"\bsysinfo\s*\(|\bsys/sysinfo\.h\b", f"nak_mem_available_bytes() {_H}"),
        ("prctl", r"\bprctl\b", _HELPER_DIR),
        ("sched_setaffinity", r"\bsched_setaffinity\b",
         f"llama.cpp's thread pool (cpu_strict), or {_HELPER_DIR} (macOS has no CPU affinity)"),
        ("pthread_setaffinity_np", r"\bpthread_setaffinity_np\b",
         f"llama.cpp's thread pool (cpu_strict), or {_HELPER_DIR} (macOS has no CPU affinity)"),
        ("MAP_POPULATE", r"\bMAP_POPULATE\b", "plain mmap, then touch the pages"),
        ("O_TMPFILE", r"\bO_TMPFILE\b", "mkstemp() then unlink()"),
        ("TCP_KEEPIDLE", r"\bTCP_KEEPIDLE\b", f"{_HELPER_DIR} (macOS calls it TCP_KEEPALIVE)"),
        ("<linux/...>", r"[<\"]linux/", _HELPER_DIR),
        ("pipe2", r"\bpipe2\b", "pipe() then fcntl(FD_CLOEXEC / O_NONBLOCK)"),
        ("dup3", r"\bdup3\b", "dup2() then fcntl(FD_CLOEXEC)"),
        ("memfd_create", r"\bmemfd_create\b", "mkstemp() then unlink(), or shm_open()"),
        ("signalfd", r"\bsignalfd\b", "a self-pipe written by the signal handler"),
        ("timerfd", r"\btimerfd_\w+", "poll() timeouts"),
        ("inotify", r"\binotify_\w+", _HELPER_DIR),
        ("MSG_MORE", r"\bMSG_MORE\b", "one send() of the whole frame"),
        ("TCP_CORK", r"\bTCP_CORK\b", "one send() of the whole frame (TCP_NOPUSH on macOS)"),
        ("TCP_QUICKACK", r"\bTCP_QUICKACK\b", _HELPER_DIR),
        ("SO_BINDTODEVICE", r"\bSO_BINDTODEVICE\b", "bind() to the interface's address"),
        ("gettid", r"\bgettid\b", "std::this_thread::get_id()"),
        ("malloc_trim", r"\bmalloc_trim\b", _HELPER_DIR),
        ("malloc_usable_size", r"\bmalloc_usable_size\b", "keep the size yourself"),
        ("mallinfo", r"\bmallinfo2?\b", f"nak_rss_bytes() {_H}"),
        ("posix_fadvise", r"\bposix_fadvise\b", _HELPER_DIR),
        ("posix_fallocate", r"\bposix_fallocate\b", "ftruncate(), or " + _HELPER_DIR),
        ("mremap", r"\bmremap\b", "munmap() + mmap()"),
        ("sendfile", r"\bsendfile\b", f"read() + nak_send_nosignal() {_H} (macOS's sendfile differs)"),
        ("CLOCK_BOOTTIME", r"\bCLOCK_BOOTTIME\b", "std::chrono::steady_clock"),
        ("__linux__", r"\b__linux__\b|\b__gnu_linux__\b", "move the branch into cpp/platform/"),
        ("page size 4096", r"\*\s*4096\b|\b4096\s*\*", "sysconf(_SC_PAGESIZE) (16 KiB pages on Apple silicon)"),
    ]
]


def _token_before(text: str, i: int) -> str:
    """The identifier or number that ends right before ``text[i]`` ("" if none): tells a literal's
    prefix (u8"..", L'x') from a name, and a digit separator (1'000) from a character literal."""
    j = i
    while j > 0 and (text[j - 1].isalnum() or text[j - 1] == "_"):
        j -= 1
    return text[j:i]


def strip_comments(text: str) -> str:
    """``text`` with every comment's characters replaced by spaces (newlines kept, so line
    numbers stay), string and character literals left as they are. Handles ``//`` and ``/* */``
    comments, escapes in literals, and raw strings ``R"delim(...)delim"``."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "/" and text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            # a backslash before the newline continues a // comment onto the next line
            while j < n and j > i and text[j - 1] == "\\":
                k = text.find("\n", j + 1)
                j = n if k < 0 else k
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "/" and text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "R" and text.startswith('R"', i) and _token_before(text, i) in ("", "u8", "u", "U", "L"):
            m = re.match(r'R"([^()\\\s]{0,16})\(', text[i:])
            if not m:
                out.append(c)
                i += 1
                continue
            end = text.find(")" + m.group(1) + '"', i + m.end())
            end = n if end < 0 else end + len(m.group(1)) + 2
            out.append(text[i:end])
            i = end
        elif c == "'" and _token_before(text, i)[:1].isdigit():
            out.append(c)  # a digit separator (1'000'000), not a character literal
            i += 1
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(text[i:j])
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def check_text(text: str) -> list[tuple[int, str, str]]:
    """The findings in one source text: (line number from 1, rule name, what to use instead)."""
    found = []
    for lineno, line in enumerate(strip_comments(text).splitlines(), 1):
        for name, rx, use in RULES:
            if rx.search(line):
                found.append((lineno, name, use))
    return found


def sources(root: Path) -> list[Path]:
    """The C/C++ files under ``root``, outside ``root/platform/``, sorted."""
    skip = root / "platform"
    return sorted(p for p in root.rglob("*")
                  if p.suffix in SOURCE_SUFFIXES and p.is_file() and skip not in p.parents)


def check_tree(root: Path) -> list[str]:
    """Every finding under ``root`` as ``path:line: NAME: use HELPER`` (path relative to the
    root's parent, e.g. ``cpp/protocol/net.cpp``)."""
    root = root.resolve()
    out = []
    for path in sources(root):
        rel = path.relative_to(root.parent)
        for lineno, name, use in check_text(path.read_text(encoding="utf-8", errors="replace")):
            out.append(f"{rel}:{lineno}: {name}: use {use}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent,
                    help="the tree to scan (default: the cpp/ folder holding this script)")
    args = ap.parse_args(argv)
    if not args.root.is_dir():
        print(f"check_portable: {args.root} is not a folder", file=sys.stderr)
        return 2
    findings = check_tree(args.root)
    for f in findings:
        print(f)
    n = len(sources(args.root.resolve()))
    if findings:
        print(f"check_portable: {len(findings)} Linux-only name(s) in {n} files outside "
              f"{args.root.name}/platform/; move them behind cpp/platform/platform.h", file=sys.stderr)
        return 1
    print(f"check_portable: {n} files, no Linux-only names outside {args.root.name}/platform/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
