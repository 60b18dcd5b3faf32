"""Portability (macOS as well as Linux): the C++ keeps Linux-only names in cpp/platform/
(cpp/check_portable.py), the platform helpers do on Linux what the calls they replace did, the
Python package imports where there is no /proc, and every feature that reads /proc either has a
fallback or says it needs Linux /proc."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nakshatra import procfs
from nakshatra.errors import NakError

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
    from nakshatra.server.local import LocalStages

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
    status = Path("/proc/self/status").read_text()
    kib = {k: int(re.search(rf"^{k}:\s+(\d+) kB", status, re.M).group(1)) * 1024 for k in ("RssAnon", "RssFile", "RssShmem")}
    # own (anonymous) and file-backed: what the host pays, and what it can reclaim
    assert h["rss_anon_bytes"] == pytest.approx(kib["RssAnon"], rel=0.05)
    assert h["rss_file_bytes"] == pytest.approx(kib["RssFile"] + kib["RssShmem"], rel=0.05)
    assert h["rss_file_bytes"] > 50 * 2**20  # the mmap'd SmolLM2 (about 98 MB) is mostly file-backed
    assert 0.9 * min(avail0, avail1) <= h["mem_available_bytes"] <= 1.1 * max(avail0, avail1)


# ---- Python: /proc only through nakshatra.procfs -----------------------------------------------

def test_python_reads_proc_only_through_procfs() -> None:
    """No module builds a /proc or /sys path itself: each reader uses procfs.PROC, so the
    degraded-path tests below (which move PROC) cover every reader."""
    found = []
    for path in sorted([*(ROOT / "python" / "nakshatra").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]):
        if path.name == "procfs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    node.value.startswith(("/proc", "/sys")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "read /proc through nakshatra.procfs.PROC:\n" + "\n".join(found)


@pytest.fixture
def no_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """procfs.PROC pointed at a folder that does not exist: a machine without /proc (macOS)."""
    missing = tmp_path / "no-proc"
    monkeypatch.setattr(procfs, "PROC", missing)
    assert not procfs.available()
    return missing


@pytest.mark.skipif(not LINUX, reason="the readers' Linux results are the reference")
def test_proc_readers_work_with_proc() -> None:
    """The readers' Linux path (so the degraded-path tests compare against something real)."""
    from nakshatra.bench import side_by_side as bench, soak
    from nakshatra.cluster import processes

    assert procfs.available()
    assert bench.peak_rss_bytes(os.getpid()) > 0 and bench.proc_status_bytes(os.getpid(), "VmRSS") > 0
    assert soak._fds(os.getpid()) > 0
    assert re.fullmatch(r"\d+", processes._identity(os.getpid()))


def test_bench_peak_rss_without_proc(no_proc: Path) -> None:
    from nakshatra.bench import side_by_side as bench
    from nakshatra_cli.main import _peak_rss_cell

    assert bench.peak_rss_bytes(os.getpid()) == 0
    assert bench.proc_status_bytes(os.getpid(), "VmRSS") == 0
    assert _peak_rss_cell(0) == "n/a: needs Linux /proc"
    assert _peak_rss_cell(5 * 2**20) == "5"


def test_soak_refuses_without_proc(no_proc: Path, tmp_path: Path) -> None:
    """Without /proc the soak's leak checks would read zeros and pass: it refuses instead, before
    touching the model."""
    from nakshatra.bench import soak

    with pytest.raises(NakError, match=r"nak soak needs Linux /proc.*/proc/PID/fd"):
        soak.run_soak(tmp_path / "missing.gguf", duration_s=1)
    assert soak._fds(os.getpid()) == 0
    assert soak._close_wait_sockets(os.getpid()) == 0
    assert soak._fd_targets(os.getpid()) == set()


def test_identity_without_proc_uses_ps(no_proc: Path) -> None:
    """`nak down` tells a process it started from a later one with the same pid: without /proc,
    by ps's start time (macOS); a process that is gone is gone."""
    from nakshatra.cluster import processes

    if shutil.which("ps") is None:
        pytest.skip("no ps on this machine")
    me = processes._identity(os.getpid())
    assert me and me != "?" and me == processes._identity(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert processes._identity(p.pid) == ""


def test_nak_down_stops_processes_without_proc(no_proc: Path) -> None:
    """`nak down`'s stop_processes stops a running stage where there is no /proc (it once took
    a missing /proc/PID/stat for "gone" and left every process running on macOS)."""
    from nakshatra.cluster import processes

    if shutil.which("ps") is None:
        pytest.skip("no ps on this machine")
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = {"pid": p.pid, "identity": processes._identity(p.pid)}
        [res] = processes.stop_processes([rec], timeout_s=10)
        assert res["stopped"] == "term"
        assert p.wait(timeout=10) == -15  # SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


VM_STAT_ARM64 = """\
Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                                3721.
Pages active:                            249005.
Pages inactive:                          246093.
Pages speculative:                         2148.
Pages throttled:                              0.
Pages wired down:                         96498.
Pages purgeable:                           6066.
"Translation faults":                 893449474.
Pages copy-on-write:                   31197196.
Pages zero filled:                    385432950.
Pages reactivated:                      9051741.
Pages purged:                           1690421.
File-backed pages:                       149466.
Anonymous pages:                         348780.
Pages stored in compressor:              410215.
Pages occupied by compressor:            131476.
Decompressions:                        13306224.
Compressions:                          18802557.
Pageins:                               23218004.
Pageouts:                                197484.
Swapins:                                1380434.
Swapouts:                               1797064.
"""


def test_vm_stat_parse() -> None:
    from nakshatra.cluster.plan import vm_stat_available_bytes

    assert vm_stat_available_bytes(VM_STAT_ARM64) == (3721 + 2148 + 246093) * 16384
    intel = VM_STAT_ARM64.replace("16384", "4096")
    assert vm_stat_available_bytes(intel) == (3721 + 2148 + 246093) * 4096
    with pytest.raises(ValueError):
        vm_stat_available_bytes("MemAvailable: 123 kB\n")
    with pytest.raises(ValueError):
        vm_stat_available_bytes("Mach Virtual Memory Statistics: (page size of 4096 bytes)\n")


def test_available_memory_without_proc(no_proc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nak plan --probe` without /proc/meminfo: vm_stat where there is one (macOS), else the
    free pages sysconf reports, else a NakError that says what to pass instead."""
    from nakshatra.cluster import plan

    # macOS: a vm_stat on PATH (this one prints a real Apple silicon vm_stat's output)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "vm_stat"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write({VM_STAT_ARM64!r})\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert plan.available_memory_mb() == (3721 + 2148 + 246093) * 16384 / 2**20

    # no vm_stat: free physical pages (glibc; macOS's sysconf has no SC_AVPHYS_PAGES)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    if "SC_AVPHYS_PAGES" in os.sysconf_names:
        page = os.sysconf("SC_PAGE_SIZE")
        lo = os.sysconf("SC_AVPHYS_PAGES") * page / 2**20
        got = plan.available_memory_mb()
        hi = os.sysconf("SC_AVPHYS_PAGES") * page / 2**20
        assert 0.9 * min(lo, hi) <= got <= 1.1 * max(lo, hi)

    # nothing at all (as macOS without vm_stat): a message, not a crash
    real_sysconf = os.sysconf

    def sysconf_like_macos(name):
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return real_sysconf(name)

    monkeypatch.setattr(os, "sysconf", sysconf_like_macos)
    with pytest.raises(NakError, match=r"cannot tell this machine's free memory .*give mem=MiB yourself"):
        plan.available_memory_mb()


# ---- the whole package where there is no /proc -------------------------------------------------

_NO_PROC_CHILD = textwrap.dedent("""
    import importlib, json, os, subprocess, sys
    from pathlib import Path

    model, modules = sys.argv[1], json.loads(sys.argv[2])
    assert not os.path.exists("/proc/self") and not os.path.exists("/proc/meminfo"), "/proc is still there"
    for name in modules:
        importlib.import_module(name)
    print("imported", len(modules))

    from nakshatra import procfs

    from nakshatra.bench import side_by_side as bench

    from nakshatra.cluster import plan

    from nakshatra.bench import soak

    from nakshatra.cluster import processes
    from nakshatra.errors import NakError
    from nakshatra_cli.main import _peak_rss_cell

    assert not procfs.available()
    assert bench.peak_rss_bytes(os.getpid()) == 0 and _peak_rss_cell(0) == "n/a: needs Linux /proc"
    try:
        soak.run_soak(Path("missing.gguf"), duration_s=1)
        raise AssertionError("nak soak ran without /proc")
    except NakError as e:
        assert "needs Linux /proc" in str(e), e
    assert plan.available_memory_mb() > 0  # sysconf's free pages (sysinfo(2), no /proc)
    # ps cannot look without /proc here (procps): the process runs, its start time is unknown
    assert processes._identity(os.getpid()) == "?"
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert processes._identity(p.pid) == ""
    print("degraded ok")

    # the C++ side: a stage loads and reports its health (rss unknown, free pages from sysconf)
    from nakshatra import _nakshatra
    h = _nakshatra.Stage(model, n_ctx=64, max_sessions=1, n_threads=1).info()["health"]
    assert h["rss_bytes"] == 0 and h["mem_available_bytes"] > 0, h
    print("stage ok")

    for args in (["--help"], ["doctor"]):
        r = subprocess.run([sys.executable, "-m", "nakshatra_cli", *args], capture_output=True, text=True)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    print("cli ok")
""")


def _package_modules() -> list[str]:
    """Every module of the nakshatra package and the CLI, from the source tree (a new module is
    covered without touching this test), plus the compiled extension. ``__main__`` modules run
    the CLI when imported: the child runs ``python -m nakshatra_cli`` instead."""
    mods = ["nakshatra", "nakshatra._nakshatra", "nakshatra_cli"]
    for pkg, folder in (("nakshatra", ROOT / "python" / "nakshatra"), ("nakshatra_cli", ROOT / "cli" / "nakshatra_cli")):
        for p in sorted(folder.rglob("*.py")):
            parts = p.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__main__" or parts == ("__init__",):
                continue
            mods.append(".".join((pkg, *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return mods


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="hides /proc with a Linux mount namespace (unshare)")
@pytest.mark.skipif(LINUX and os.geteuid() != 0,
                    reason="needs root to hide /proc in a mount namespace (unshare --mount); CI runs as root")
def test_package_imports_and_degrades_without_proc(smollm2_path: Path, tmp_path: Path) -> None:
    """In a mount namespace with an empty tmpfs over /proc and /sys (as on macOS, no /proc at
    all): every module imports, each /proc reader degrades as documented, a stage loads, and the
    CLI runs. As root this must run: a failing unshare fails the test instead of skipping it."""
    assert shutil.which("unshare"), "unshare (util-linux) is missing"
    modules = _package_modules()
    assert "nakshatra.bench.soak" in modules and "nakshatra_cli.main" in modules
    script = ('mount -t tmpfs none /proc && mount -t tmpfs none /sys && exec "$0" -c "$1" "$2" "$3"')
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                        sys.executable, _NO_PROC_CHILD, str(smollm2_path), json.dumps(modules)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    assert f"imported {len(modules)}" in r.stdout
    for step in ("degraded ok", "stage ok", "cli ok"):
        assert step in r.stdout, r.stdout
    assert procfs.available()  # the namespace did not hide this process's /proc
