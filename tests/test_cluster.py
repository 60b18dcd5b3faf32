"""The cluster file commands, run as a user runs them: ``nak up FILE`` starts this host's stages
and prints the command for every other host, that command fetches its slice over HTTP (sha256 and
metadata checked) and serves, ``nak status FILE`` shows the chain, the chain generates what the
unsplit model generates, ``nak down FILE`` stops exactly what ``nak up`` started.

127.0.0.2 is loopback on Linux too; ``--this-host 127.0.0.1`` makes it "another host".
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from fileserver import FileServer
from nakshatra import _nakshatra
from nakshatra.auth import generate_key_file, load_key
from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.cluster.config import load_cluster
from nakshatra.cluster.fetch import fetch_slice
from nakshatra.cluster.processes import port_in_use, state_path
from nakshatra.cluster.up import is_this_host, plan_instances, remote_command
from nakshatra.errors import NakError
from nakshatra.gguf.manifest import Manifest, sha256_file
from nakshatra.gguf.slicer import slice_model
from nakshatra.ranges import LayerRange

CTX = 512
PROMPT = "The history of astronomy is long. Describe how early people used the stars to navigate"


def nak(*args: str, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; Rich does not wrap its messages (wide COLUMNS)."""
    return subprocess.run([sys.executable, "-m", "nakshatra_cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd, env={**os.environ, "COLUMNS": "1000"})


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_cluster(path: Path, stages: list[dict], **top: object) -> Path:
    path.write_text(tomli_w.dumps({"model": "smollm2", **top, "stages": stages}))  # model: a built-in name
    return path


@pytest.fixture(scope="module")
def sliced(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """SmolLM2 cut into 0-9, 10-19, 20-29 (a folder with a manifest)."""
    out = tmp_path_factory.mktemp("slices")
    m = slice_model(smollm2_path, ranges=[LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30)], out_dir=out,
                    progress=False)
    return out, m


def serve_fetch(dest: Path, url: str, sha: str, *extra: str) -> subprocess.CompletedProcess:
    """``nak serve DEST --fetch URL --sha256 SHA`` as another host runs it (fails before loading
    in these tests)."""
    return nak("serve", str(dest), "--port", "0", "--fetch", url, "--sha256", sha, *extra, timeout=60)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---- fast: which host, the printed command, refusals --------------------------------------------------

def test_this_host() -> None:
    assert is_this_host("127.0.0.1") and is_this_host("localhost") and is_this_host(socket.gethostname())
    assert not is_this_host("192.0.2.1")  # TEST-NET-1: never this machine's address
    assert is_this_host("127.0.0.1", ["127.0.0.1"]) and not is_this_host("127.0.0.2", ["127.0.0.1"])
    assert is_this_host("localhost", ["127.0.0.1"])


def test_plan_and_remote_command(tmp_path: Path) -> None:
    cf = load_cluster(write_cluster(tmp_path / "c.toml", [
        {"host": "127.0.0.1", "port": 7071, "layers": "0-9"},
        {"host": "10.0.0.6", "port": 7072, "layers": "10-29", "slice": "b.gguf", "replicas": ["127.0.0.1:7073"]},
    ], key_file="cluster.key", slices_dir="s", options={"ctx": 1024, "max_sessions": 4, "mode": "ring"}))
    insts = plan_instances(cf, ["127.0.0.1"])
    assert [(i.address, i.slice, i.local, i.replica_of) for i in insts] == [
        ("127.0.0.1:7071", "smollm2.0-9.gguf", True, ""), ("10.0.0.6:7072", "b.gguf", False, ""),
        ("127.0.0.1:7073", "b.gguf", True, "10.0.0.6:7072")]
    cmd = shlex.split(remote_command(cf, insts[1], "http://10.0.0.5:7070/slices/b.gguf", "ab" * 32,
                                     ["--ctx", "1024", "--max-sessions", "4"]))
    assert cmd[:3] == ["nak", "serve", "s/b.gguf"]
    text = " ".join(cmd)
    for part in ("--layers 10-29", "--host 10.0.0.6", "--port 7072", "--ctx 1024", "--max-sessions 4",
                 "--key-file cluster.key", "--fetch http://10.0.0.5:7070/slices/b.gguf", f"--sha256 {'ab' * 32}"):
        assert part in text


def test_up_refuses_without_key_off_loopback(tmp_path: Path) -> None:
    f = write_cluster(tmp_path / "c.toml", [{"host": "192.0.2.1", "port": 7071, "layers": "0-29"}])
    r = nak("up", str(f))
    assert r.returncode == 1
    assert "192.0.2.1" in r.stderr and "nak keygen" in r.stderr and "Traceback" not in r.stderr


def test_up_refuses_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        f = write_cluster(tmp_path / "c.toml", [{"host": "127.0.0.1", "port": port, "layers": "0-29"}])
        r = nak("up", str(f))
    assert r.returncode == 1
    assert f"port {port} is in use" in r.stderr and "Traceback" not in r.stderr
    assert not state_path(f).exists() and not (tmp_path / "slices").exists()


def test_up_refuses_a_slice_of_other_layers(tmp_path: Path, sliced: tuple[Path, Manifest]) -> None:
    folder, m = sliced
    f = write_cluster(tmp_path / "c.toml", [{"host": "127.0.0.1", "port": free_port(), "layers": "0-29",
                                             "slice": m.slices[0].file}], slices_dir=str(folder))
    r = nak("up", str(f))
    assert r.returncode == 1
    assert "holds layers 0-9" in r.stderr and "0-29" in r.stderr


def test_status_of_a_cluster_file(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    f = write_cluster(tmp_path / "c.toml", [{"host": "127.0.0.1", "port": ports[0], "layers": "0-9"},
                                            {"host": "127.0.0.1", "port": ports[1], "layers": "10-29"}])
    r = nak("status", str(f), "--json")
    assert r.returncode == 0, r.stderr
    assert [(s["address"], s["up"], s["role"]) for s in json.loads(r.stdout)] == [
        (f"127.0.0.1:{p}", False, "down") for p in ports]
    r = nak("status")
    assert r.returncode == 1 and "cluster file" in r.stderr and "--chain" in r.stderr
    r = nak("down", str(f))
    assert r.returncode == 0 and "nothing is up" in r.stderr


# ---- fast: fetching a slice -------------------------------------------------------------------------

def test_fetch_refuses_wrong_sha256(tmp_path: Path, sliced: tuple[Path, Manifest]) -> None:
    folder, m = sliced
    name = m.slices[1].file
    dest = tmp_path / "remote" / name
    with FileServer(folder, [name]) as fs:
        r = serve_fetch(dest, fs.url(name), "0" * 64)
    assert r.returncode == 1
    assert fs.url(name) in r.stderr and "sha256" in r.stderr and "nak up" in r.stderr
    assert leftovers(dest.parent) == []  # nothing, not even a partial download


def test_fetch_refuses_a_corrupt_file(tmp_path: Path, sliced: tuple[Path, Manifest]) -> None:
    folder, m = sliced
    info = m.slices[1]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    data = bytearray((folder / info.file).read_bytes())
    data[-1000] ^= 0xFF  # in the tensor data
    (bad_dir / info.file).write_bytes(data)
    dest = tmp_path / "remote" / info.file
    with FileServer(bad_dir, [info.file]) as fs:
        # the file served is not the one the manifest recorded
        r = serve_fetch(dest, fs.url(info.file), info.sha256)
        assert r.returncode == 1
        assert fs.url(info.file) in r.stderr and f"not the {info.sha256}" in r.stderr
        assert leftovers(dest.parent) == []
        # its whole-file sha256 is the one given, but its data fails the slice's own hash
        r = serve_fetch(dest, fs.url(info.file), sha256_file(bad_dir / info.file))
        assert r.returncode == 1
        assert "fails its own check" in r.stderr and "corrupt" in r.stderr
        assert leftovers(dest.parent) == []


def test_fetch_with_cluster_key(tmp_path: Path, sliced: tuple[Path, Manifest]) -> None:
    folder, m = sliced
    info = m.slices[2]
    key = generate_key_file(tmp_path / "cluster.key")
    other = generate_key_file(tmp_path / "other.key")
    dest = tmp_path / "remote" / info.file
    with FileServer(folder, [info.file], key=key) as fs:
        r = serve_fetch(dest, fs.url(info.file), info.sha256)
        assert r.returncode == 1 and "403" in r.stderr and "--key-file" in r.stderr
        r = serve_fetch(dest, fs.url(info.file), info.sha256, "--key-file", str(tmp_path / "other.key"))
        assert r.returncode == 1 and "not the one the server has" in r.stderr
        assert leftovers(dest.parent) == []
        with pytest.raises(NakError, match="404"):
            fetch_slice([fs.url("smollm2.gguf")], dest, info.sha256, key=key)  # not offered
        assert fetch_slice([fs.url(info.file)], dest, info.sha256, key=key, progress=False) is True
        assert sha256_file(dest) == info.sha256 and leftovers(dest.parent) == [info.file]
        assert fetch_slice([fs.url(info.file)], dest, info.sha256, key=other) is False  # already there
    with pytest.raises(NakError, match="exists but its sha256"):
        fetch_slice([], dest, m.slices[0].sha256)
    with pytest.raises(NakError, match="cannot connect"):
        fetch_slice([f"http://127.0.0.1:{free_port()}/slices/x.gguf"], tmp_path / "x.gguf", info.sha256)


# ---- slow: the whole flow ---------------------------------------------------------------------------

def _wait_up(cluster: Path, n: int, proc: subprocess.Popen, timeout_s: float = 60) -> list[dict]:
    """`nak status FILE --json` once ``n`` stages are up (or ``proc`` exited, or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = nak("status", str(cluster), "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        if sum(s["up"] for s in rows) == n or proc.poll() is not None or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


@pytest.mark.slow
def test_up_fetch_status_generate_down(smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAKSHATRA_CACHE_DIR", str(tmp_path / "cache"))  # nak up's state and logs
    p0, p2, p3, pf = (free_port() for _ in range(4))
    p1 = free_port("127.0.0.2")
    generate_key_file(tmp_path / "cluster.key")
    cluster = write_cluster(tmp_path / "cluster.toml", [
        {"host": "127.0.0.1", "port": p0, "layers": "0-9"},
        {"host": "127.0.0.2", "port": p1, "layers": "10-19"},  # "another host": gets a printed command
        {"host": "127.0.0.1", "port": p2, "layers": "20-29", "replicas": [f"127.0.0.1:{p3}"]},
    ], model=str(smollm2_path), key_file=str(tmp_path / "cluster.key"), slices_dir="slices",
        options={"ctx": CTX, "max_sessions": 2, "mode": "relay"})
    cf = load_cluster(cluster)
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    remote = None
    try:
        r = nak("up", str(cluster), "--this-host", "127.0.0.1", "--files-port", str(pf))
        assert r.returncode == 0, r.stderr
        state = json.loads(state_path(cluster).read_text())
        pids = [p["pid"] for p in state["processes"]]
        assert len(pids) == 4  # 3 local stages and the slice file server
        manifest = Manifest.load(tmp_path / "slices" / "smollm2.manifest.json")
        sha = {s.file: s.sha256 for s in manifest.slices}["smollm2.10-19.gguf"]
        cmds = [ln for ln in r.stdout.splitlines() if ln.startswith("nak serve")]
        assert len(cmds) == 1 and all(ln.startswith(("#", "nak serve")) for ln in r.stdout.splitlines())
        cmd = shlex.split(cmds[0])
        text = " ".join(cmd)
        assert f"--fetch http://127.0.0.1:{pf}/slices/smollm2.10-19.gguf --sha256 {sha}" in text
        assert f"--host 127.0.0.2 --port {p1}" in text and "--layers 10-19" in text and "--key-file" in text

        again = nak("up", str(cluster), "--this-host", "127.0.0.1", "--files-port", str(pf))
        assert again.returncode == 1 and "already up" in again.stderr and "nak down" in again.stderr

        # the other host: an empty folder, the printed command as is
        with open(remote_dir / "serve.log", "wb") as log:
            remote = subprocess.Popen([sys.executable, "-m", "nakshatra_cli", *cmd[1:]], cwd=remote_dir,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        rows = _wait_up(cluster, 4, remote)
        log_text = (remote_dir / "serve.log").read_text()
        assert all(s["up"] for s in rows), (rows, log_text)
        assert "fetched" in log_text and "sha256 ok" in log_text
        assert sha256_file(remote_dir / "slices" / "smollm2.10-19.gguf") == sha
        assert leftovers(remote_dir / "slices") == ["smollm2.10-19.gguf"]
        assert sorted(s["role"] for s in rows) == ["replica", "serving", "serving", "serving"]

        with Chain(cf.addresses(), key=load_key(tmp_path / "cluster.key")) as chain:
            prompt = chain.tokenize(PROMPT)
            got = [t for t, _ in chain.generate_tokens(prompt, 16, SamplerParams(temp=0.0))]
        want = _nakshatra.Reference(str(smollm2_path), n_ctx=CTX).generate(prompt, 16, temp=0.0)
        assert len(got) > 0 and got == list(want)

        r = nak("down", str(cluster))
        assert r.returncode == 0, r.stderr
        assert all(_pid_gone(p) for p in pids)
        assert not state_path(cluster).exists()
        assert not any(port_in_use("127.0.0.1", p) for p in (p0, p2, p3, pf))
        assert remote.poll() is None  # not started by nak up: left alone
    finally:
        if remote is not None:
            remote.terminate()
            remote.wait(timeout=30)
        nak("down", str(cluster))
