"""LAN discovery (DNS-SD over mDNS, ``_nakshatra._tcp``): stages announce model sha256 and layer
range; ``discover_chain`` / ``nak run --discover`` build the chain from what answers and refuse an
incomplete one, naming the missing layers.

Where the tests run: on the loopback interface (the ``loopback_mdns`` fixture checks that
multicast works there, turns ``lo`` multicast on when root if it does not, and skips only if it
still cannot), and, when root with iproute2, on a LAN of network namespaces joined by a bridge
(each stage and the client on a "host" of its own).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nakshatra import _nakshatra
from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.cluster.discovery import (
    MIN_TIMEOUT_S,
    Announcer,
    Browser,
    Found,
    announce_plan,
    chain_from,
    discover,
    discover_chain,
)
from nakshatra.errors import NakError
from nakshatra.gguf.manifest import Manifest
from nakshatra.gguf.slicer import slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.local import LocalStages

LO = ["127.0.0.1"]
PROTO = int(_nakshatra.PROTOCOL_VERSION)
SHA = "ab" * 32
PROMPT = "The capital of France is"
N_PREDICT = 12
RANGES = [LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30)]


def _flat(text: str) -> str:
    """Rich wraps stderr at 80 columns when piped: compare with whitespace collapsed."""
    return " ".join(text.split())


def _until(what: Callable[[], object], timeout_s: float, why: str) -> object:
    """Poll ``what()`` every 0.2 s until it is truthy; fail naming ``why`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = what()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{why} (waited {timeout_s:g} s)")
        time.sleep(0.2)


# ---- multicast on loopback ----------------------------------------------------------------

def _multicast_works(iface: str = "127.0.0.1") -> bool:
    """Whether a datagram sent to 224.0.0.251 out of ``iface`` comes back to a member socket
    (what mDNS on that interface needs); a private port, so no responder on 5353 is involved."""
    port = 20000 + secrets.randbelow(20000)
    group = socket.inet_aton("224.0.0.251")
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind(("", port))
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group + socket.inet_aton(iface))
        rx.settimeout(1.0)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        token = secrets.token_bytes(8)
        tx.sendto(token, ("224.0.0.251", port))
        while True:
            if rx.recv(64) == token:
                return True
    except OSError:
        return False
    finally:
        rx.close()
        tx.close()


@pytest.fixture(scope="session")
def loopback_mdns() -> Iterator[None]:
    """mDNS works on 127.0.0.1 (on Linux it usually does as is; if not and we are root, turn
    multicast on for ``lo`` and off again afterwards)."""
    if _multicast_works():
        yield
        return
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("multicast on the loopback interface does not work here, and turning it on "
                    "(`ip link set lo multicast on`) needs root and iproute2")
    subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], check=False, capture_output=True)
    try:
        if not _multicast_works():
            pytest.skip("multicast on the loopback interface does not work here, even after "
                        "`ip link set lo multicast on`")
        yield
    finally:
        subprocess.run(["ip", "link", "set", "lo", "multicast", "off"], check=False, capture_output=True)


# ---- choosing the chain (no network) ------------------------------------------------------

def F(addr: str, start: int, end: int, sha: str = SHA, n_layer: int = 30, proto: int = PROTO,
      name: str = "smollm2") -> Found:
    host, port = addr.rsplit(":", 1)
    return Found(name=f"{addr} {start}", addresses=(host,), port=int(port), model_sha256=sha,
                 layers=LayerRange(start, end), n_layer=n_layer, arch="llama", protocol=proto,
                 key_required=False, model_name=name)


def test_chain_joins_ranges_in_layer_order_with_replicas() -> None:
    found = [F("10.0.0.3:1", 20, 30), F("10.0.0.1:1", 0, 10), F("10.0.0.2:2", 10, 20), F("10.0.0.2:1", 10, 20)]
    assert chain_from(found) == ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.2:2", "10.0.0.3:1"]


def test_chain_prefers_fewest_hops_then_most_replicas() -> None:
    # two ways to cut: 0-14,15-29 (two hops) beats 0-9,10-19,20-29 (three)
    found = [F("a:1", 0, 10), F("b:1", 10, 20), F("c:1", 20, 30), F("d:1", 0, 15), F("e:1", 15, 30)]
    assert chain_from(found) == ["d:1", "e:1"]
    # equal hops: the cut with more stages (replicas) wins
    found = [F("a:1", 0, 15), F("b:1", 15, 30), F("c:1", 0, 10), F("d:1", 10, 30), F("e:1", 10, 30)]
    assert chain_from(found) == ["c:1", "d:1", "e:1"]


@pytest.mark.parametrize("ranges, needle", [
    ([(0, 10), (20, 30)], "layers 10-19 are served by no stage that answered"),
    ([(0, 5), (6, 30)], "layer 5 is served by no stage that answered"),
    ([(10, 20)], "layers 0-9 and 20-29 are served by no stage that answered"),
    ([(0, 10), (12, 20), (25, 30)], "layers 10-11 and 20-24 are served"),
    ([(0, 10), (12, 20), (25, 28)], "layers 10-11, 20-24 and 28-29 are served"),
    ([(0, 28)], "layers 28-29 are served"),
])
def test_incomplete_chain_names_the_missing_layers(ranges: list[tuple[int, int]], needle: str) -> None:
    with pytest.raises(NakError, match=re.escape(needle)) as e:
        chain_from([F(f"h{i}:7071", a, b) for i, (a, b) in enumerate(ranges)])
    assert "h0:7071" in str(e.value)  # and says what did answer


def test_ranges_that_do_not_join_are_refused() -> None:
    with pytest.raises(NakError, match="do not join: none starts at layer 15"):
        chain_from([F("a:1", 0, 15), F("b:1", 10, 30)])


def test_several_models_need_model_sha() -> None:
    other = "cd" * 32
    found = [F("a:1", 0, 30), F("b:1", 0, 18, sha=other, n_layer=18, name="gemma3")]
    with pytest.raises(NakError, match="stages of 2 models answered") as e:
        chain_from(found)
    assert SHA[:12] in str(e.value) and other[:12] in str(e.value) and "gemma3" in str(e.value)
    assert "--model-sha" in str(e.value)
    assert chain_from(found, model_sha256=other[:8].upper()) == ["b:1"]
    assert chain_from(found, model_sha256=SHA) == ["a:1"]
    with pytest.raises(NakError, match="no stage of model ef"):
        chain_from(found, model_sha256="ef")
    with pytest.raises(NakError, match="not a hex sha256"):
        chain_from(found, model_sha256="xyz")


def test_nothing_answered_and_other_protocols_are_refused() -> None:
    with pytest.raises(NakError, match="no Nakshatra stage answered"):
        chain_from([])
    with pytest.raises(NakError, match=r"layers 10-29 are served.*another protocol.*b:1 \(v999\)"):
        chain_from([F("a:1", 0, 10), F("b:1", 10, 30, proto=999)])


def test_announce_plan_addresses() -> None:
    assert announce_plan("127.0.0.1") == (["127.0.0.1"], ["127.0.0.1"])
    assert announce_plan("localhost")[0] == ["127.0.0.1"]
    interfaces, addrs = announce_plan("0.0.0.0")  # every interface; its non-loopback addresses
    assert interfaces is None and addrs
    assert addrs == ["127.0.0.1"] or not any(a.startswith("127.") for a in addrs)
    with pytest.raises(NakError, match="no IPv4 address"):
        announce_plan("::1")


# ---- announce and browse on loopback (no stage) -------------------------------------------

def test_announcement_is_found_and_withdrawn_by_goodbye(loopback_mdns: None) -> None:
    sha = secrets.token_hex(32)  # a model no other announcement can have
    with Browser(LO) as b:
        a = Announcer(host="127.0.0.1", port=45678, model_sha256=sha, layers=LayerRange(3, 7), n_layer=12,
                      arch="llama", key_required=True, model_name="toy")
        with a:
            assert a.name.endswith("._nakshatra._tcp.local.") and "layers 3-6" in a.name
            mine = _until(lambda: [f for f in b.found() if f.model_sha256 == sha], 5, "the announcement was not found")
            assert len(mine) == 1
            f = mine[0]
            assert (f.address, f.port, f.layers, f.n_layer, f.arch, f.protocol, f.key_required, f.model_name) == \
                ("127.0.0.1:45678", 45678, LayerRange(3, 7), 12, "llama", PROTO, True, "toy")
            # an incomplete model: the refusal names the layers nobody serves
            with pytest.raises(NakError, match=re.escape("layers 0-2 and 7-11 are served by no stage that answered")):
                discover_chain(MIN_TIMEOUT_S, model_sha256=sha[:10], interfaces=LO)
            assert [x.address for x in discover(MIN_TIMEOUT_S, model_sha256=sha, interfaces=LO)] == ["127.0.0.1:45678"]
            # shorter than RFC 6762 lets a responder answer a second client: refused, not a silent miss
            with pytest.raises(NakError, match=r"discovery timeout 1\.0 s is too short.*at least 1\.5 s"):
                discover(1.0, model_sha256=sha, interfaces=LO)
        # closed: the goodbye withdraws it at once (its records would otherwise live 120 s / 75 min)
        _until(lambda: not [f for f in b.found() if f.model_sha256 == sha], 3, "no goodbye after close()")


# ---- real stages on loopback --------------------------------------------------------------

@pytest.fixture(scope="module")
def slices(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str]:
    out = tmp_path_factory.mktemp("smol-discovery")
    m = slice_model(smollm2_path, RANGES, out_dir=out, progress=False)
    return [out / s.file for s in m.slices], Manifest.load(next(out.glob("*.manifest.json"))).model["sha256"]


def _stages(paths: list[Path], announce: list[bool]) -> LocalStages:
    return LocalStages(paths, threads=1, ctx=256, max_sessions=2, cpu_lock=False,
                       stage_args=[["--announce"] if a else [] for a in announce])


def _greedy(addresses: list[str], **kw: object) -> list[int]:
    with Chain(addresses, **kw) as c:
        return [t for t, _ in c.generate_tokens(c.tokenize(PROMPT), N_PREDICT, SamplerParams(temp=0.0))]


def _ours(b: Browser, addresses: list[str]) -> dict[str, Found]:
    return {f.address: f for f in b.found() if f.address in addresses}


def _wait_found(b: Browser, addresses: list[str], n: int, timeout_s: float = 15) -> dict[str, Found]:
    """The stages of ``addresses`` that ``b`` sees, once there are ``n`` (registration takes
    about 1.5 s after a stage is ready)."""
    got: dict[str, Found] = {}

    def ready() -> bool:
        got.clear()
        got.update(_ours(b, addresses))
        return len(got) == n

    _until(ready, timeout_s, f"{n} of the stages {addresses} were not found announcing")
    return got


def _nak(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nakshatra_cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="class")
def replicated(slices: tuple[list[Path], str], loopback_mdns: None) -> Iterator[LocalStages]:
    """Stages 0-9, 10-19 twice, 20-29 announcing on loopback, and one more 20-29 that does not
    (loopback without --announce: the default is not to); up for the tests of one class."""
    paths, _ = slices
    with _stages([paths[0], paths[1], paths[1], paths[2], paths[2]], [True, True, True, True, False]) as ls:
        yield ls


@pytest.mark.slow
class TestReplicatedStages:
    """Stages that stay up for the tests of the class (torn down before the next test, whose
    stages would otherwise meet these in discovery)."""

    def test_discovered_chain_generates_what_the_known_chain_does(self, replicated: LocalStages,
                                                                   slices: tuple[list[Path], str]) -> None:
        paths, sha = slices
        announced = replicated.addresses[:4]
        with Browser(LO) as b:
            found = _wait_found(b, replicated.addresses, 4)
        assert replicated.addresses[4] not in found  # a loopback stage announces only with --announce
        for addr, want in zip(announced, [RANGES[0], RANGES[1], RANGES[1], RANGES[2]], strict=True):
            f = found[addr]
            assert (f.layers, f.model_sha256, f.n_layer, f.arch, f.protocol, f.key_required) == \
                (want, sha, 30, "llama", PROTO, False)
            assert f.model_name == paths[0].name.split(".")[0]
        chain = discover_chain(2.0, model_sha256=sha, interfaces=LO)
        assert chain[0] == announced[0] and sorted(chain[1:3]) == sorted(announced[1:3]) and chain[3] == announced[3]
        assert len(chain) == 4, f"stages of this model announced on loopback by someone else? {chain}"
        with Chain(chain) as c:  # what the TXT records said is what the stages say in HELLO_OK
            assert [len(g) for g in c.replicas] == [1, 2, 1]
            for group in c.replicas:
                for st in group:
                    assert (found[st.address].layers, found[st.address].model_sha256) == (st.layers, st.model_sha256)
        known = [replicated.addresses[i] for i in (0, 1, 4)]  # no replica, the unannounced last stage
        want = _greedy(known)
        assert len(want) == N_PREDICT
        assert _greedy(chain) == want
        assert _greedy(chain, ring=True) == want

    def test_nak_run_discover_end_to_end(self, replicated: LocalStages, slices: tuple[list[Path], str]) -> None:
        _, sha = slices
        gen = ("--temp", "0", "-n", str(N_PREDICT), PROMPT)
        with Browser(LO) as b:
            _wait_found(b, replicated.addresses, 4)
        d = _nak("run", "--discover", "--discover-timeout", "2", "--model-sha", sha[:12], *gen)
        k = _nak("run", "--chain", ",".join(replicated.addresses[i] for i in (0, 1, 4)), *gen)
        assert d.returncode == 0, d.stderr
        assert k.returncode == 0, k.stderr
        assert d.stdout == k.stdout and d.stdout.strip()
        assert "discovered 4 stages" in d.stderr
        c = _nak("discover", "--chain", "--timeout", "2", "--model-sha", sha)
        assert c.returncode == 0, c.stderr
        assert c.stdout.strip().split(",")[0] == replicated.addresses[0] and len(c.stdout.split(",")) == 4
        j = _nak("discover", "--json", "--timeout", "2", "--model-sha", sha)
        doc = json.loads(j.stdout)
        assert {s["address"] for s in doc["stages"]} >= set(replicated.addresses[:4]) and doc["error"] is None
        assert _nak("run", "--discover", "--chain", "a:1", "hi").returncode == 1

    def test_nak_api_discover(self, replicated: LocalStages, slices: tuple[list[Path], str]) -> None:
        """`nak api --discover` serves the chain that answers: the same stages, the same text."""
        import httpx

        _, sha = slices
        with Browser(LO) as b:
            _wait_found(b, replicated.addresses, 4)
        p = subprocess.Popen([sys.executable, "-m", "nakshatra_cli", "api", "--discover", "--discover-timeout", "2",
                              "--model-sha", sha[:12], "--port", "0", "--model-id", "smol"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            url = p.stdout.readline().strip()
            assert url.startswith("http://"), "nak api --discover did not start"
            cluster = httpx.get(url + "/api/cluster", timeout=30).json()
            assert {s["address"] for s in cluster["stages"]} == set(replicated.addresses[:4])
            r = httpx.post(url + "/v1/completions", json={"model": "smol", "prompt": PROMPT, "max_tokens": N_PREDICT,
                                                          "temperature": 0}, timeout=120).json()
        finally:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=20)
            p.stdout.close()
        k = _nak("run", "--chain", ",".join(replicated.addresses[i] for i in (0, 1, 4)), "--raw", "--temp", "0",
                 "-n", str(N_PREDICT), PROMPT)
        assert r["choices"][0]["text"] == k.stdout.rstrip("\n")


@pytest.mark.slow
def test_stopped_and_killed_stages_are_no_longer_discovered(slices: tuple[list[Path], str],
                                                            loopback_mdns: None) -> None:
    paths, sha = slices
    with _stages(paths, [True, True, True]) as ls:
        with Browser(LO) as b:
            _wait_found(b, ls.addresses, 3)
            assert discover_chain(1.5, model_sha256=sha, interfaces=LO) == ls.addresses
            # SIGTERM: the stage stops cleanly and says goodbye, so even a browser that saw it
            # drops it at once (without the goodbye its records would stay cached 120 s and more)
            os.kill(ls.pids[1], signal.SIGTERM)
            _until(lambda: ls.addresses[1] not in _ours(b, ls.addresses), 5, "the stopped stage was still announced")
        with pytest.raises(NakError, match=re.escape("layers 10-19 are served by no stage that answered")):
            discover_chain(1.5, model_sha256=sha, interfaces=LO)
        r = _nak("run", "--discover", "--model-sha", sha, "-n", "4", "hi")
        assert r.returncode == 1 and r.stdout == ""
        assert "layers 10-19 are served by no stage that answered" in _flat(r.stderr)
        # SIGKILL: no goodbye, but a killed stage no longer answers a fresh discovery
        os.kill(ls.pids[2], signal.SIGKILL)
        with pytest.raises(NakError, match=re.escape("layers 10-29 are served by no stage that answered")) as e:
            discover_chain(1.5, model_sha256=sha, interfaces=LO)
        assert ls.addresses[0] in str(e.value)


def test_a_stage_swapped_to_another_model_announces_it(slices: tuple[list[Path], str], gemma3_path: Path,
                                                        tmp_path: Path, loopback_mdns: None) -> None:
    """After an in-place model swap (nakshatra.client.swap) each stage withdraws its old record
    and announces the new model's sha256 and layer range: discovery finds the new chain."""
    from nakshatra.client.swap import swap_stages

    paths, sha = slices
    g = slice_model(gemma3_path, [LayerRange(0, 6), LayerRange(6, 12), LayerRange(12, 18)], out_dir=tmp_path,
                    progress=False)
    gsha = g.model["sha256"]
    with _stages(paths, [True, True, True]) as ls:
        with Browser(LO) as b:
            _wait_found(b, ls.addresses, 3)
        swap_stages([(a, {"model": str(tmp_path / s.file), "layers": None}) for a, s in zip(ls.addresses, g.slices)])

        def found() -> list[str] | None:
            try:
                return discover_chain(1.5, model_sha256=gsha, interfaces=LO)
            except NakError:
                return None

        assert _until(found, 30, "the swapped stages were not found announcing Gemma") == ls.addresses
        with pytest.raises(NakError):  # nobody announces SmolLM2 any more
            discover_chain(1.5, model_sha256=sha, interfaces=LO)


# ---- a LAN of network namespaces ----------------------------------------------------------

class Lan:
    """Network namespaces ``<prefix>-h1..hN`` ("hosts", 10.77.0.i/24 on eth0) joined by a bridge in
    ``<prefix>-lan``; nothing is added to this machine's own namespace."""

    def __init__(self, n_hosts: int) -> None:
        self.prefix = f"nakd{os.getpid()}"
        self.names: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.n_hosts = n_hosts

    def ip(self, *args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def host(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def up(self) -> None:
        lan = f"{self.prefix}-lan"
        self.ip("netns", "add", lan)
        self.names.append(lan)
        self.ip("-n", lan, "link", "add", "br0", "type", "bridge")
        self.ip("-n", lan, "link", "set", "br0", "up")
        for i in range(1, self.n_hosts + 1):
            h = self.host(i)
            self.ip("netns", "add", h)
            self.names.append(h)
            self.ip("link", "add", "eth0", "netns", h, "type", "veth", "peer", "name", f"v{i}", "netns", lan)
            self.ip("-n", lan, "link", "set", f"v{i}", "master", "br0", "up")
            self.ip("-n", h, "addr", "add", f"10.77.0.{i}/24", "dev", "eth0")
            self.ip("-n", h, "link", "set", "eth0", "up")
            self.ip("-n", h, "link", "set", "lo", "up")

    def run(self, i: int, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.host(i), *cmd], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def serve(self, i: int, *args: str, log: Path) -> int:
        """Start ``python -m nakshatra.server.serve ARGS`` on host ``i``; returns its port once ready."""
        with open(log, "wb") as lf:
            p = subprocess.Popen(["ip", "netns", "exec", self.host(i), sys.executable, "-m", "nakshatra.server.serve",
                                  *args, "--ready-json"], stdout=subprocess.PIPE, stderr=lf, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            line = p.stdout.readline() if sel.select(timeout=120) else b""
        if not line:
            pytest.fail(f"stage on {self.host(i)} did not start:\n{log.read_text(errors='replace')[-2000:]}")
        return int(json.loads(line)["port"])

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()
        for n in reversed(self.names):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.fixture
def lan() -> Iterator[Lan]:
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("a LAN of network namespaces needs Linux, root and iproute2 (`ip`)")
    net = Lan(4)
    try:
        try:
            net.up()
        except OSError as e:
            pytest.skip(f"cannot make network namespaces here: {e}")
        yield net
    finally:
        net.down()


@pytest.mark.slow
def test_discovery_across_a_lan_of_namespaces(lan: Lan, slices: tuple[list[Path], str], tmp_path: Path) -> None:
    """Three "hosts" serve a slice each with a cluster key, announcing by default (not loopback):
    one on its address, one on 0.0.0.0 (it announces its LAN address), one on its address; a
    fourth host runs `nak run --discover` over the ring, and gets what `--chain` gets."""
    from nakshatra.auth import generate_key_file

    paths, sha = slices
    key = tmp_path / "cluster.key"
    generate_key_file(key)
    common = ("--port", "7071", "--threads", "1", "--ctx", "256", "--max-sessions", "1", "--key-file", str(key))
    for i, host in ((1, "10.77.0.1"), (2, "0.0.0.0"), (3, "10.77.0.3")):
        assert lan.serve(i, str(paths[i - 1]), "--host", host, *common, log=tmp_path / f"h{i}.log") == 7071
    addrs = [f"10.77.0.{i}:7071" for i in (1, 2, 3)]
    nak = (sys.executable, "-m", "nakshatra_cli")
    deadline = time.monotonic() + 20
    while True:
        j = lan.run(4, *nak, "discover", "--json", "--timeout", "1.5")
        doc = json.loads(j.stdout) if j.returncode == 0 else {}
        if doc.get("chain") == addrs or time.monotonic() > deadline:
            break
    assert doc.get("chain") == addrs, f"{j.stdout}\n{j.stderr}"
    assert all(s["key_required"] and s["model_sha256"] == sha for s in doc["stages"])
    assert [s["addresses"] for s in doc["stages"]] == [[a.split(":")[0]] for a in addrs]  # 0.0.0.0: its LAN address
    gen = ("--key-file", str(key), "--temp", "0", "-n", str(N_PREDICT), PROMPT)
    d = lan.run(4, *nak, "run", "--discover", "--ring", *gen)
    k = lan.run(4, *nak, "run", "--chain", ",".join(addrs), *gen)
    assert d.returncode == 0, d.stderr
    assert k.returncode == 0, k.stderr
    assert d.stdout == k.stdout and d.stdout.strip()
    # without the key, the discovered stages refuse the client
    r = lan.run(4, *nak, "run", "--discover", "-n", "2", "hi")
    assert r.returncode == 1 and "requires the cluster key" in _flat(r.stderr), r.stderr
