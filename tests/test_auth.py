"""Cluster-key authentication (cpp/protocol/auth.h): both ends prove the key over fresh nonces,
every later frame carries a MAC; refused clients get `unauthorized`, altered or replayed bytes
close the connection, and a keyed chain generates what an unkeyed one does."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from frames import AUTH, AUTH_OK, ERROR, HDR, HELLO, HELLO_OK, STATS, STATS_OK, frame, frame_type, read_frame_bytes
from nakshatra import _nakshatra
from nakshatra.auth import generate_key_file, load_key, parse_key
from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.errors import ChainError, NakError, StageError
from nakshatra.server.local import LocalStages, cached_parts
from nakshatra.server.serve import check_host

CAP_AUTH, FLAG_MAC, UNAUTHORIZED = 1 << 3, 1, 5
PROMPT = "The stars tonight are"


def mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


class PyClient:
    """The handshake and frame MACs written from the spec in auth.h, independently of the C++."""

    def __init__(self, address: str, key: bytes) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.key = key
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        self.sock.sendall(data)

    def handshake(self, hello: bytes | None = None, auth: bytes | None = None) -> bytes:
        """Returns the stage's last frame (AUTH_OK, or ERROR). `hello` / `auth`: replay these bytes."""
        nc = os.urandom(32)
        hello = hello or frame(HELLO, struct.pack("<Q", 1 | CAP_AUTH) + nc + struct.pack("<I", 2) + b"py" + struct.pack("<I", 0))
        nc = hello[HDR.size + 8:HDR.size + 40]
        self.send(hello)
        ok = read_frame_bytes(self.sock)
        assert frame_type(ok) == HELLO_OK, ok
        caps, = struct.unpack_from("<Q", ok, HDR.size + 2)
        assert caps & CAP_AUTH
        ns = ok[HDR.size + 10:HDR.size + 42]
        t = hashlib.sha256(hello + ok).digest()
        self.send(auth or frame(AUTH, mac(self.key, b"nakshatra-v1 client", nc, ns, t)))
        r = read_frame_bytes(self.sock)
        if frame_type(r) == AUTH_OK:
            assert r[HDR.size:] == mac(self.key, b"nakshatra-v1 stage", ns, nc, t)
            self.ks = mac(self.key, b"nakshatra-v1 session", nc, ns, t)
            self.ctr_out = self.ctr_in = 0
        return r

    def seal(self, f: bytes, ctr: int | None = None) -> bytes:
        m, v, t, fl, rid, sid, dt, n = HDR.unpack_from(f)
        hdr = HDR.pack(m, v, t, fl | FLAG_MAC, rid, sid, dt, n + 16)
        c = self.ctr_out if ctr is None else ctr
        self.ctr_out += 1
        return hdr + f[HDR.size:] + mac(self.ks, b"C", struct.pack("<Q", c), hdr, f[HDR.size:])[:16]

    def recv_sealed(self) -> bytes:
        r = read_frame_bytes(self.sock)
        assert HDR.unpack_from(r)[3] & FLAG_MAC
        want = mac(self.ks, b"S", struct.pack("<Q", self.ctr_in), r[:HDR.size], r[HDR.size:-16])[:16]
        assert hmac.compare_digest(want, r[-16:])
        self.ctr_in += 1
        return r[:-16]

    def closed(self) -> bool:
        """Whether the stage closes the connection (within 5 s); closes our end too."""
        self.sock.settimeout(5)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, socket.timeout):
            return False
        finally:
            self.sock.close()


class Proxy:
    """A TCP relay in front of a stage that can flip one byte of the next chunk either way."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.address = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.tamper = {"up": False, "down": False}
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(self.target)
            self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(65536):
                if self.tamper[way]:
                    self.tamper[way] = False
                    data = data[:-1] + bytes([data[-1] ^ 0x01])
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.lsock.close()
        for s in self.socks:
            s.close()


def greedy(addresses, key=None, **kw) -> list[int]:
    with Chain(addresses, key=key, **kw) as c:
        return [t for t, _ in c.generate_tokens(c.tokenize(PROMPT), 8, SamplerParams(temp=0))]


@pytest.fixture(scope="module")
def slices(smollm2_path: Path) -> list[Path]:
    return cached_parts(smollm2_path, 2, progress=False)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("key") / "cluster.key"
    generate_key_file(p)
    return p


@pytest.fixture(scope="module")
def keyed(slices, key_file):
    with LocalStages(slices, threads=2, ctx=256, max_sessions=4, key_file=key_file) as st:
        yield st


@pytest.fixture(scope="module")
def plain(slices):
    with LocalStages(slices, threads=2, ctx=256, max_sessions=4) as st:
        yield st


def test_hmac_matches_python() -> None:
    for key in (b"", b"k", os.urandom(32), os.urandom(64), os.urandom(100)):
        for n in (0, 1, 55, 56, 63, 64, 65, 1000, 100_000):
            data = os.urandom(n)
            assert _nakshatra.hmac_sha256(key, data) == hmac.new(key, data, hashlib.sha256).digest()


def test_keygen_writes_a_private_key(tmp_path: Path) -> None:
    out = tmp_path / "k.key"
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "keygen", "-o", str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = load_key(out)
    assert len(key) == 32 and out.read_text().strip() == key.hex()
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "keygen", "-o", str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and load_key(out) == key  # never overwritten silently
    with pytest.raises(NakError):
        parse_key("abcd", "x")


def test_key_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    k = os.urandom(32)
    monkeypatch.setenv("NAK_KEY", k.hex())
    assert load_key(None) == k
    other = tmp_path / "o.key"
    generate_key_file(other)
    assert load_key(other) != k  # --key-file wins
    monkeypatch.setenv("NAK_KEY", "nothex")
    with pytest.raises(NakError, match="NAK_KEY"):
        load_key(None)


def test_non_loopback_needs_a_key_or_insecure(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(NakError, match="keygen"):
        check_host("0.0.0.0", insecure=False)
    check_host("0.0.0.0", insecure=False, key=os.urandom(32))
    check_host("127.0.0.1", insecure=False)
    check_host("0.0.0.0", insecure=True)
    assert "WITHOUT AUTHENTICATION" in capsys.readouterr().err


def test_keyed_chain_generates_the_same_tokens(keyed, plain, key_file) -> None:
    key = load_key(key_file)
    want = greedy(plain.addresses)
    assert greedy(keyed.addresses, key) == want
    assert greedy(keyed.addresses, key, forwarding=True) == want  # stage-to-stage, authenticated
    assert greedy(keyed.addresses, key, ring=True) == want        # last stage back to the first


def test_clients_without_the_key_are_refused(keyed, plain, key_file) -> None:
    key = load_key(key_file)
    host, port = keyed.addresses[0].rsplit(":", 1)
    for bad in (b"", os.urandom(32)):
        c = _nakshatra.StageClient(host, int(port), key=bad)
        with pytest.raises(StageError) as e:
            c.hello()
        assert e.value.code == "unauthorized"
        c.close()
    with pytest.raises(ChainError, match="cluster key"):
        Chain(keyed.addresses)
    # a client with a key refuses a stage without one
    phost, pport = plain.addresses[0].rsplit(":", 1)
    c = _nakshatra.StageClient(phost, int(pport), key=key)
    with pytest.raises(StageError) as e:
        c.hello()
    assert e.value.code == "unauthorized"
    # the stage keeps serving a good client
    assert len(greedy(keyed.addresses, key)) == 8


def test_handshake_from_the_spec_and_no_replay(keyed, key_file) -> None:
    key = load_key(key_file)
    a = PyClient(keyed.addresses[0], key)
    assert frame_type(a.handshake()) == AUTH_OK
    a.send(a.seal(frame(STATS, request_id=7)))
    assert frame_type(a.recv_sealed()) == STATS_OK
    hello, auth = a.sent[0], a.sent[1]
    # the same HELLO and AUTH on a new connection: the stage's nonce is fresh, the proof is stale
    b = PyClient(keyed.addresses[0], b"\0" * 32)
    r = b.handshake(hello=hello, auth=auth)
    assert frame_type(r) == ERROR and struct.unpack_from("<H", r, HDR.size)[0] == UNAUTHORIZED
    assert b.closed()
    # a frame replayed on the authenticated connection (same counter) closes it
    a.send(a.seal(frame(STATS, request_id=8), ctr=0))
    assert a.closed()


@pytest.mark.parametrize("how", ["flip", "no_mac", "reorder"])
def test_altered_frames_close_the_connection(keyed, key_file, how: str) -> None:
    key = load_key(key_file)
    a = PyClient(keyed.addresses[0], key)
    assert frame_type(a.handshake()) == AUTH_OK
    if how == "flip":
        f = bytearray(a.seal(frame(STATS, request_id=2)))
        f[HDR.size - 5] ^= 0x10  # the header's reserved bytes are MACed too
        a.send(bytes(f))
    elif how == "no_mac":
        a.send(frame(STATS, request_id=2))
    else:
        f1, f2 = a.seal(frame(STATS, request_id=2)), a.seal(frame(STATS, request_id=3))
        a.send(f2 + f1)
    r = read_frame_bytes(a.sock)
    assert frame_type(r) == ERROR and struct.unpack_from("<H", r, HDR.size)[0] == UNAUTHORIZED
    assert a.closed()


@pytest.mark.parametrize("way", ["up", "down"])
def test_byte_flipped_in_flight_closes_the_connection(keyed, key_file, way: str) -> None:
    key = load_key(key_file)
    proxy = Proxy(keyed.addresses[0])
    try:
        host, port = proxy.address.rsplit(":", 1)
        c = _nakshatra.StageClient(host, int(port), timeout_ms=5000, key=key)
        c.hello()
        assert c.hello()["layer_start"] == 0  # HELLO again: an ordinary MACed request
        c.stats()
        proxy.tamper[way] = True
        with pytest.raises(StageError) as e:
            c.stats()
        assert e.value.code in ("unauthorized", "transport")
        assert "authentication" in str(e.value) or "MAC" in str(e.value)
        c.close()
    finally:
        proxy.close()
    assert len(greedy(keyed.addresses, key)) == 8


def test_a_stage_refuses_to_forward_to_a_stage_without_the_key(keyed, plain, key_file) -> None:
    key = load_key(key_file)
    hops = {keyed.addresses[1]: plain.addresses[1]}  # the first stage is sent to an unkeyed stage
    with Chain(keyed.addresses, key=key, forwarding=True, timeout_s=20, hop_addresses=hops) as c:
        with pytest.raises(StageError) as e:
            list(c.generate_tokens(c.tokenize(PROMPT), 4, SamplerParams(temp=0)))
        assert e.value.code == "unauthorized" and "cluster key" in str(e.value)
    assert len(greedy(keyed.addresses, key, forwarding=True)) == 8


def test_a_next_stage_gone_during_the_handshake_is_next_hop_not_a_refused_key(keyed, key_file) -> None:
    """A next stage that accepts the connection and dies before the key handshake ends went away;
    it did not refuse the key. The step's owner hears ``next_hop`` (the client then looks for a
    dead stage and fails over), not ``unauthorized`` (a configuration error it would give up on)."""
    key = load_key(key_file)
    gone = socket.socket()
    gone.bind(("127.0.0.1", 0))
    gone.listen(4)

    def accept_and_close() -> None:
        try:
            conn, _ = gone.accept()
            conn.recv(4096)  # the stage's HELLO: then the "stage" dies
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=accept_and_close, daemon=True)
    t.start()
    try:
        host, port = keyed.addresses[0].rsplit(":", 1)
        owner = _nakshatra.StageClient(host, int(port), timeout_ms=20_000, key=key)
        owner.hello()
        owner.open(9, temp=0.0)
        owner.send_forward(9, 0, [0, 1, 2], [1, 2, 3], False, f"127.0.0.1:{gone.getsockname()[1]}", "")
        with pytest.raises(StageError) as e:
            _nakshatra.wait_forward_ok([owner], 20_000, owner.last_request_id)
        assert e.value.code == "next_hop" and "went away during the key handshake" in str(e.value), e.value
        owner.close()
    finally:
        t.join(timeout=10)
        gone.close()


def test_a_keyed_client_cannot_use_another_clients_session(keyed, key_file) -> None:
    """The key admits a client to the stage, not to other clients' sessions."""
    from test_protocol import _intruder_is_refused

    key = load_key(key_file)
    host, port = keyed.addresses[0].rsplit(":", 1)
    owner = _nakshatra.StageClient(host, int(port), key=key)
    owner.hello()
    owner.open(77, temp=0.0, token=0xC0FFEE)
    _intruder_is_refused(keyed.addresses[0], owner, key)
    owner.close_session(77)
    owner.close()


def _nak(*args: str, **kw) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, without $NAK_KEY: a key reaches it only as the command is told."""
    env = {k: v for k, v in os.environ.items() if k != "NAK_KEY"}
    return subprocess.run([sys.executable, "-m", "nakshatra_cli", *args], capture_output=True, text=True,
                          timeout=180, env={**env, "COLUMNS": "1000"}, **kw)


def test_nak_chat_takes_the_key_of_a_cluster_file(keyed, key_file, tmp_path: Path) -> None:
    """``nak chat --cluster FILE`` (and ``nak api --cluster``, the same lookup) authenticates with
    the file's key_file, a path relative to the file, as ``nak status FILE`` does."""
    import tomli_w

    key = load_key(key_file)
    question = "What is the capital of France?"
    with Chain(keyed.addresses, key=key) as c:
        want = "".join(c.generate(question, 8, SamplerParams(temp=0), chat=True))
        stages = [{"host": s.host, "port": s.port, "layers": s.layers.inclusive()} for s in c.stages]
    assert want.strip()
    f = tmp_path / "c.toml"
    f.write_text(tomli_w.dumps({"model": "smollm2", "key_file": os.path.relpath(key_file, tmp_path),
                                "stages": stages}))
    r = _nak("chat", "--cluster", str(f), "--temp", "0", "-n", "8", input=question + "\n\n")
    assert r.returncode == 0, r.stderr
    assert want in r.stdout, r.stdout
    f.write_text(tomli_w.dumps({"model": "smollm2", "stages": stages}))  # no key_file: refused
    r = _nak("chat", "--cluster", str(f), "--temp", "0", "-n", "8", input=question + "\n\n")
    assert r.returncode == 1 and "cluster key" in r.stderr, r.stderr


def test_nak_plan_from_keyed_stages_takes_key_file(keyed, key_file, smollm2_path: Path) -> None:
    """``nak plan --stages`` asks every stage for its memory and speed: keyed stages answer only
    with ``--key-file``, and the cluster file written names that key file."""
    addrs = ",".join(keyed.addresses)
    r = _nak("plan", str(smollm2_path), "--stages", addrs, "--key-file", str(key_file), "--ctx", "256",
             "--max-sessions", "1")
    assert r.returncode == 0, r.stderr
    import tomllib

    cf = tomllib.loads(r.stdout)
    assert cf["key_file"] == str(Path(key_file).resolve())
    assert [h["address"] for h in cf["hosts"]] == ["127.0.0.1"] and cf["hosts"][0]["layers_per_s"] > 0
    r = _nak("plan", str(smollm2_path), "--stages", addrs, "--ctx", "256", "--max-sessions", "1")
    assert r.returncode == 1 and "does not answer" in r.stderr and "cluster key" in r.stderr, r.stderr
