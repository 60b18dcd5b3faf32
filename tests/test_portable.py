"""Portability (macOS as well as Linux): the C++ keeps Linux-only names in cpp/platform/
(cpp/check_portable.py), and the platform helpers do on Linux what the calls they replace did."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "cpp" / "check_portable.py"
LINUX = sys.platform.startswith("linux")


def run_check(root: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), *(["--root", str(root)] if root else [])],
                          capture_output=True, text=True, timeout=60)


# ---- cpp/check_portable.py --------------------------------------------------------------------

def test_cpp_has_no_linux_only_names_outside_platform() -> None:
    """The real tree: every Linux-only name is behind cpp/platform/platform.h."""
    r = run_check()
    assert r.returncode == 0, f"Linux-only names outside cpp/platform/:\n{r.stdout}{r.stderr}"
    n = int(re.search(r"check_portable: (\d+) files", r.stdout).group(1))
    # it scanned the tree (net.cpp, server.cpp, stage.cpp, module.cpp, ...), not an empty folder
    assert n >= 10


# (code that must be flagged, the rule name the check reports)
LINUX_ONLY = [
    ("int fd = accept4(lfd, nullptr, nullptr, 0);", "accept4"),
    ("int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);", "SOCK_NONBLOCK"),
    ("int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);", "SOCK_CLOEXEC"),
    ("send(fd, p, n, MSG_NOSIGNAL);", "MSG_NOSIGNAL"),
    ("long p = sysconf(_SC_AVPHYS_PAGES);", "_SC_AVPHYS_PAGES"),
    ("long p = sysconf(_SC_PHYS_PAGES);", "_SC_PHYS_PAGES"),
    ('FILE * f = fopen("/proc/self/statm", "r");', "/proc/"),
    ('std::ifstream in("/sys/devices/system/cpu/online");', "/sys/"),
    ("int ep = epoll_create1(0);", "epoll"),
    ("#include <sys/epoll.h>", "epoll"),
    ("int e = eventfd(0, 0);", "eventfd"),
    ("struct sysinfo si; sysinfo(&si);", "sysinfo("),
    ("#include <sys/sysinfo.h>", "sysinfo("),
    ("prctl(PR_SET_PDEATHSIG, SIGTERM);", "prctl"),
    ("sched_setaffinity(0, sizeof(set), &set);", "sched_setaffinity"),
    ("pthread_setaffinity_np(t, sizeof(set), &set);", "pthread_setaffinity_np"),
    ("void * p = mmap(nullptr, n, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);", "MAP_POPULATE"),
    ('int fd = open("/tmp", O_TMPFILE | O_RDWR, 0600);', "O_TMPFILE"),
    ("setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &s, sizeof(s));", "TCP_KEEPIDLE"),
    ("return resident * 4096;", "page size 4096"),
    ("return (uint64_t) resident*4096;", "page size 4096"),
    ("size_t b = 4096 * pages;", "page size 4096"),
    ("#include <linux/if.h>", "<linux/...>"),
    ("pipe2(fds, O_CLOEXEC);", "pipe2"),
    ("#if defined(__linux__)", "__linux__"),
]


@pytest.mark.parametrize("code,name", LINUX_ONLY, ids=[f"{i}-{n}" for i, (_, n) in enumerate(LINUX_ONLY)])
def test_check_flags_linux_only_code(tmp_path: Path, code: str, name: str) -> None:
    """Each Linux-only name in code is reported as path:line: NAME: use HELPER, and fails the
    check; the same text in a comment, or under platform/, is not."""
    src = tmp_path / "cpp" / "stage" / "x.cpp"
    src.parent.mkdir(parents=True)
    src.write_text(f"// a file\n#include <cstdio>\n\n{code}\n")
    r = run_check(tmp_path / "cpp")
    assert r.returncode == 1
    assert f"cpp/stage/x.cpp:4: {name}: use " in r.stdout, r.stdout

    src.write_text(f"// a file\n// {code}\n/* {code}\n   {code} */\nint x = 0; // {code}\n")
    r = run_check(tmp_path / "cpp")
    assert r.returncode == 0, r.stdout

    src.unlink()
    (tmp_path / "cpp" / "platform").mkdir()
    (tmp_path / "cpp" / "platform" / "platform.cpp").write_text(f"{code}\n")
    r = run_check(tmp_path / "cpp")
    assert r.returncode == 0, r.stdout


def test_check_reads_literals_and_skips_only_comments() -> None:
    """The lexer's edge cases: a // inside a string is not a comment, a string is checked, a
    digit separator is not a character literal, identifiers match whole."""
    sys.path.insert(0, str(CHECK.parent))
    try:
        import check_portable as cp
    finally:
        sys.path.remove(str(CHECK.parent))

    def names(code: str) -> list[tuple[int, str]]:
        return [(line, name) for line, name, _ in cp.check_text(code)]

    assert names('const char * u = "http://x"; int fd = accept4(l, 0, 0, 0);') == [(1, "accept4")]
    assert names('const char * u = "// not a comment /proc/meminfo";') == [(1, "/proc/")]
    assert names("char q = '\"'; int fd = accept4(l, 0, 0, 0);") == [(1, "accept4")]
    assert names("int n = 1'000'000; int fd = accept4(l, 0, 0, 0);") == [(1, "accept4")]
    assert names("int n = 1'000; // accept4\n") == []
    assert names('auto s = R"(// accept4 )"; // MSG_NOSIGNAL\n') == [(1, "accept4")]
    assert names("/* a\n b accept4\n */ x = MSG_NOSIGNAL;\n") == [(3, "MSG_NOSIGNAL")]
    assert names("int my_accept4_count = 0; int SOCK_CLOEXEC_X = 1;") == []
    # 4096 that is not a multiplication (a context size, a limit) is not a page size
    assert names("uint32_t n_ctx = 4096; if (n_msg > 4096) {}") == []


def test_check_cli_on_missing_root(tmp_path: Path) -> None:
    r = run_check(tmp_path / "nothing")
    assert r.returncode == 2 and "is not a folder" in r.stderr


# ---- the platform helpers on Linux (cpp/platform/platform.cpp) --------------------------------

def _fd_flags(pid: int, fd: int) -> int:
    """The open flags of a process's descriptor (fdinfo, octal; O_CLOEXEC shows as 02000000)."""
    text = (Path("/proc") / str(pid) / "fdinfo" / str(fd)).read_text()
    return int(re.search(r"^flags:\s+([0-7]+)", text, re.M).group(1), 8)


def _sockets(pid: int) -> dict[int, str]:
    out = {}
    for fd in (Path("/proc") / str(pid) / "fd").iterdir():
        try:
            t = os.readlink(fd)
        except OSError:
            continue
        if t.startswith("socket:"):
            out[int(fd.name)] = t
    return out


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads the descriptors' flags from Linux /proc/PID/fdinfo")
def test_sockets_are_cloexec_and_accepted_ones_nonblocking(smollm2_path: Path) -> None:
    """nak_socket (the stage's listening socket, the client's socket) is close-on-exec;
    nak_accept gives a close-on-exec, non-blocking connection, as accept4 did."""
    from nakshatra import _nakshatra
    from nakshatra.local import LocalStages

    cloexec = 0o2000000
    with LocalStages([smollm2_path], threads=1, ctx=64, max_sessions=1) as ls:
        pid = ls.pids[0]
        before = _sockets(pid)
        mine_before = _sockets(os.getpid())
        assert before, "the stage has no listening socket"
        c = _nakshatra.StageClient("127.0.0.1", int(ls.addresses[0].rsplit(":", 1)[1]))
        try:
            c.hello()  # answered: the stage has accepted the connection
            new = set(_sockets(pid)) - set(before)
            assert len(new) == 1, (before, _sockets(pid))
            [fd] = new
            flags = _fd_flags(pid, fd)
            assert flags & cloexec and flags & os.O_NONBLOCK, oct(flags)
            assert all(_fd_flags(pid, f) & cloexec for f in before), {f: oct(_fd_flags(pid, f)) for f in before}
            [client_fd] = set(_sockets(os.getpid())) - set(mine_before)
            assert _fd_flags(os.getpid(), client_fd) & cloexec
        finally:
            c.close()


def _meminfo_available() -> int:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M).group(1)) * 1024


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="compares with Linux /proc/self/status and /proc/meminfo")
def test_stage_health_memory_matches_proc(smollm2_path: Path) -> None:
    """A stage's health: rss_bytes (nak_rss_bytes: statm pages x the real page size) is this
    process's VmRSS, mem_available_bytes (nak_mem_available_bytes) is MemAvailable."""
    from nakshatra import _nakshatra

    st = _nakshatra.Stage(str(smollm2_path), n_ctx=64, max_sessions=1, n_threads=1)
    avail0 = _meminfo_available()
    h = st.info()["health"]
    avail1 = _meminfo_available()
    vm_rss = int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024
    assert h["rss_bytes"] == pytest.approx(vm_rss, rel=0.05)
    assert 0.9 * min(avail0, avail1) <= h["mem_available_bytes"] <= 1.1 * max(avail0, avail1)
