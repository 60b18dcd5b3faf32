"""A stage given a remote model fetches only its slice's bytes (nakshatra.gguf.remote), by HTTP range
requests to `nak up`'s file server, and cuts exactly the slice `nak slice` cuts from the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fileserver import FileServer
from nakshatra import _nakshatra
from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.cluster.fileserver import _byte_range
from nakshatra.errors import NakError
from nakshatra.gguf import remote
from nakshatra.gguf.manifest import sha256_file
from nakshatra.gguf.remote import RemoteFile, fetch_slice, merge_intervals, missing_intervals
from nakshatra.gguf.slicer import cached_slice, scan_gguf
from nakshatra.ranges import LayerRange


class Server(FileServer):
    """``nak up``'s file server (range requests, sha256 ETags unless ``etags`` is false) serving
    ``files``; ``cut_after``: bytes of a body after which every transfer breaks (a flaky link);
    ``requests``: the Range header of each request."""

    def __init__(self, files: list[Path], etags: bool = True, cut_after: int | None = None) -> None:
        sums = {f.name: sha256_file(f) for f in files} if etags else {}
        super().__init__(files[0].parent, [f.name for f in files], sha256s=sums)
        self.cut_after = cut_after
        self.requests: list[str] = []
        server = self

        class Cut:
            """The connection, but a file body stops after ``cut_after`` bytes."""

            def __init__(self, sock: object) -> None:
                self.sock = sock

            def sendfile(self, f: object, offset: int = 0, count: int | None = None) -> int:
                return self.sock.sendfile(f, offset, min(count or 0, server.cut_after))

            def __getattr__(self, name: str) -> object:
                return getattr(self.sock, name)

        class Handler(self.srv.RequestHandlerClass):  # type: ignore[misc, name-defined]
            def _serve(self, body: bool) -> None:
                server.requests.append(self.headers.get("Range", ""))
                if server.cut_after is not None:
                    self.connection = Cut(self.connection)
                super()._serve(body)

        self.srv.RequestHandlerClass = Handler


class Quiet(SimpleHTTPRequestHandler):
    """The standard library's request handler, without a log line per request."""

    def log_message(self, *a: object) -> None:
        pass


@contextmanager
def stdlib_server(handler: type[SimpleHTTPRequestHandler]) -> Iterator[int]:
    """A ``ThreadingHTTPServer`` with ``handler`` in a thread; yields its port."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh Nakshatra cache: nothing fetched or cut before."""
    monkeypatch.setenv("NAKSHATRA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _model_dir(model: Path, tmp_path: Path) -> Path:
    """The model under its own name in a folder of its own (a hard link: no copy)."""
    d = tmp_path / "served"
    d.mkdir(exist_ok=True)
    (d / model.name).hardlink_to(model)
    return d / model.name


def cut_locally(model: Path, rng: LayerRange, cache: Path) -> Path:
    """The slice ``nak serve MODEL --layers`` cuts from the local file
    (:func:`nakshatra.gguf.slicer.cached_slice`), in a cache of its own."""
    old = os.environ["NAKSHATRA_CACHE_DIR"]
    os.environ["NAKSHATRA_CACHE_DIR"] = str(cache)
    try:
        sc = scan_gguf(model)
        return cached_slice(model, rng, sc.value(f"{sc.value('general.architecture')}.block_count"), progress=False)
    finally:
        os.environ["NAKSHATRA_CACHE_DIR"] = old


def test_intervals() -> None:
    assert merge_intervals([(5, 9), (0, 3), (3, 4), (20, 20), (8, 12)]) == [(0, 4), (5, 12)]
    assert merge_intervals([(0, 3), (10, 12)], gap=7) == [(0, 12)]
    assert missing_intervals([(0, 10), (20, 30)], [(2, 4), (8, 22)]) == [(0, 2), (4, 8), (22, 30)]
    assert missing_intervals([(0, 10)], []) == [(0, 10)]
    assert missing_intervals([(0, 10)], [(0, 10)]) == []


def test_byte_range_header() -> None:
    assert _byte_range("", 100) is None
    assert _byte_range("bytes=0-9", 100) == (0, 10)
    assert _byte_range("bytes=90-", 100) == (90, 100)
    assert _byte_range("bytes=90-200", 100) == (90, 100)
    assert _byte_range("bytes=-10", 100) == (90, 100)
    assert _byte_range("bytes=100-", 100) == "unsatisfiable"
    assert _byte_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole file
    assert _byte_range("items=0-1", 100) is None


@pytest.mark.parametrize("which,ranges", [
    ("smollm2", [LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30)]),
    ("gemma3", [LayerRange(0, 6), LayerRange(6, 13), LayerRange(13, 18)]),
])
def test_fetches_only_the_slice_and_cuts_the_same_bytes(which: str, ranges: list[LayerRange], smollm2_path: Path,
                                                       gemma3_path: Path, tmp_path: Path, cache: Path) -> None:
    model = _model_dir(smollm2_path if which == "smollm2" else gemma3_path, tmp_path)
    model_sha = sha256_file(model)
    with Server([model]) as srv:
        for rng in ranges:
            got = fetch_slice(RemoteFile(srv.url(model.name)), rng, progress=False)
            want = cut_locally(model, rng, tmp_path / "local-cache")
            assert got.path.read_bytes() == want.read_bytes(), f"layers {rng}"
            assert got.model_sha256 == model_sha
            # the slice's own bytes, plus at most one read window of the head past the metadata
            size = want.stat().st_size
            assert size <= got.downloaded <= size * 1.03 + remote.HEAD_STEP, (rng, got.downloaded, size)
            assert got.downloaded == pytest.approx(remote.download_bytes(model, rng), rel=0.03,
                                                   abs=remote.HEAD_STEP)
        # a second start fetches nothing: the slice is cached under the model's sha256
        again = fetch_slice(RemoteFile(srv.url(model.name), sha256=model_sha), ranges[0], progress=False)
        assert again.downloaded == 0
    assert not list((cache / "remote").glob("*/*.gguf")), "the sparse mirror is deleted once the slice is cut"


def test_a_broken_transfer_resumes_where_it_stopped(smollm2_path: Path, tmp_path: Path, cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model_dir(smollm2_path, tmp_path)
    rng = LayerRange(10, 20)
    monkeypatch.setattr(remote, "ATTEMPTS", 1)
    with Server([model], cut_after=5 << 20) as srv:  # every transfer breaks after 5 MiB
        url = srv.url(model.name)
        with pytest.raises(NakError, match="what arrived is kept: run the command again"):
            fetch_slice(RemoteFile(url), rng, progress=False)
        rec = json.loads(next((cache / "remote").glob("*/*.fetch.json")).read_text())
        kept = sum(b - a for a, b in rec["have"])
        assert kept >= 5 << 20
        srv.cut_after = None
        got = fetch_slice(RemoteFile(url), rng, progress=False)
    want = cut_locally(model, rng, tmp_path / "local-cache")
    assert got.path.read_bytes() == want.read_bytes()
    # the second run fetched only what the first had not: together about one slice
    assert kept + got.downloaded <= want.stat().st_size * 1.03 + remote.HEAD_STEP


def test_retries_a_broken_transfer_by_itself(smollm2_path: Path, tmp_path: Path, cache: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model_dir(smollm2_path, tmp_path)
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    with Server([model], cut_after=8 << 20) as srv:
        # each request brings 8 MiB: the 24 MB middle slice needs several resumed requests
        monkeypatch.setattr(remote, "ATTEMPTS", 20)
        got = fetch_slice(RemoteFile(srv.url(model.name)), LayerRange(10, 20), progress=False)
        assert len([r for r in srv.requests if r]) >= 3
    assert got.path.read_bytes() == cut_locally(model, LayerRange(10, 20), tmp_path / "local-cache").read_bytes()


def test_a_bad_download_is_not_kept(smollm2_path: Path, tmp_path: Path, cache: Path) -> None:
    model = _model_dir(smollm2_path, tmp_path)
    with Server([model]) as srv, pytest.raises(NakError, match="does not have the sha256"):
        fetch_slice(RemoteFile(srv.url(model.name)), LayerRange(0, 10), sha256="0" * 64, progress=False)
    assert not list((cache / "slices").glob("*/*.gguf"))
    assert not list((cache / "remote").glob("*/*.gguf")) and not list((cache / "remote").glob("*/*.json"))


def test_model_sha256_needed_when_the_server_does_not_say(smollm2_path: Path, tmp_path: Path, cache: Path) -> None:
    model = _model_dir(smollm2_path, tmp_path)
    with Server([model], etags=False) as srv:
        with pytest.raises(NakError, match="--model-sha256"):
            fetch_slice(RemoteFile(srv.url(model.name)), LayerRange(0, 10), progress=False)
        with pytest.raises(NakError, match="not the --model-sha256"):
            fetch_slice(RemoteFile(srv.url(model.name), sha256="1" * 64), LayerRange(0, 10),
                        model_sha256="2" * 64, progress=False)
        got = fetch_slice(RemoteFile(srv.url(model.name)), LayerRange(0, 10),
                          model_sha256=sha256_file(smollm2_path), progress=False)
    assert got.path.is_file()


def test_a_server_without_ranges_is_refused(smollm2_path: Path, tmp_path: Path, cache: Path) -> None:
    model = _model_dir(smollm2_path, tmp_path)

    class Plain(Quiet):  # the standard library's file server: no range requests
        def __init__(self, *a, **k) -> None:  # noqa: ANN002, ANN003
            super().__init__(*a, directory=str(model.parent), **k)

    with stdlib_server(Plain) as port, pytest.raises(NakError, match="does not answer range requests"):
        fetch_slice(RemoteFile(f"http://127.0.0.1:{port}/{model.name}"), LayerRange(0, 10), progress=False)
    assert not list((cache / "slices").glob("*/*.gguf"))


def test_missing_file_and_not_a_gguf(smollm2_path: Path, tmp_path: Path, cache: Path) -> None:
    d = tmp_path / "served"
    d.mkdir()
    (d / "notes.gguf").write_bytes(b"not a model at all" * 100)
    with Server([d / "notes.gguf"]) as srv:
        with pytest.raises(NakError, match="HTTP 404: no such file there"):
            fetch_slice(RemoteFile(srv.url("other.gguf")), LayerRange(0, 1), progress=False)
        with pytest.raises(Exception, match="is not a GGUF file"):
            fetch_slice(RemoteFile(srv.url("notes.gguf")), LayerRange(0, 1), progress=False)


def _serve(*args: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "nakshatra.server.serve", *args, "--port", "0", "--ready-json",
                          "--threads", "2", "--ctx", "256", "--max-sessions", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    line = p.stdout.readline()
    assert line, p.stderr.read()
    return p, f"127.0.0.1:{json.loads(line)['port']}"


def test_stages_served_from_a_url_generate_what_the_whole_model_does(smollm2_path: Path, tmp_path: Path,
                                                                     cache: Path) -> None:
    model = _model_dir(smollm2_path, tmp_path)
    procs: list[subprocess.Popen] = []
    with Server([model]) as srv:
        try:
            for layers in ("0-11", "12-29"):
                p, addr = _serve(srv.url(model.name), "--layers", layers)
                procs.append((p, addr))
            with Chain([a for _, a in procs]) as c:
                prompt = c.tokenize("The capital of France is")
                got = [t for t, _ in c.generate_tokens(prompt, 12, SamplerParams(temp=0))]
        finally:
            for p, _ in procs:
                p.terminate()
            errs = [p.communicate(timeout=30)[1] for p, _ in procs]
    ref = _nakshatra.Reference(str(smollm2_path), n_ctx=256)
    assert got == ref.generate(prompt, 12, temp=0.0)
    assert all("fetched" in e for e in errs), errs


def test_serve_a_url_needs_layers(tmp_path: Path, cache: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "serve", "http://127.0.0.1:9/m.gguf", "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "give --layers" in r.stderr


def test_follows_a_redirect_and_its_linked_etag(smollm2_path: Path, tmp_path: Path, cache: Path) -> None:
    """As a Hugging Face file URL: a 302 to the storage server, whose own ETag is no sha256; the
    redirect's ``X-Linked-Etag`` is the file's sha256."""
    model = _model_dir(smollm2_path, tmp_path)
    sha = sha256_file(model)
    with Server([model], etags=False) as store:
        target = store.url(model.name)

        class Redirect(Quiet):
            def do_GET(self) -> None:
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("Content-Length", "0")
                self.end_headers()

        with stdlib_server(Redirect) as port:
            got = fetch_slice(RemoteFile(f"http://127.0.0.1:{port}/org/repo/resolve/main/{model.name}"),
                              LayerRange(20, 30), progress=False)
    assert got.model_sha256 == sha
    assert got.path.read_bytes() == cut_locally(model, LayerRange(20, 30), tmp_path / "local-cache").read_bytes()


def test_an_hf_reference_with_layers_fetches_only_them(smollm2_path: Path, tmp_path: Path, cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``nak serve hf:ORG/REPO --layers A-B`` with the model not in the Hugging Face cache: the
    hub's file listing (its URL, token headers, size and LFS sha256; the hub itself cannot be
    reached from the tests) leads to a range fetch of just those layers."""
    from nakshatra.gguf import hub
    from nakshatra.server.serve import ServeOptions, remote_slice

    model = _model_dir(smollm2_path, tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with Server([model], etags=False) as srv:
        listing = [hub.RemoteFile(path=model.name, url=srv.url(model.name), headers={"authorization": "Bearer t"},
                                  size=model.stat().st_size, sha256=sha256_file(model))]
        monkeypatch.setattr(hub, "hf_remote_files", lambda ref: listing)
        got = remote_slice(ServeOptions(model="hf:org/SmolLM2-GGUF:Q4_1", layers="0-9"), None, False)
    assert got is not None
    assert got.read_bytes() == cut_locally(model, LayerRange(0, 10), tmp_path / "local-cache").read_bytes()


def test_a_split_model_fetches_only_the_slice_from_its_shards(gemma3_path: Path, tmp_path: Path, cache: Path) -> None:
    """A split model (three shards, as llama-gguf-split cuts it) on a server: the heads of every
    shard and the slice's tensors from whichever shards hold them; the slice equals the unsplit
    model's."""
    from nakshatra.gguf.shards import write_shards

    shards = write_shards(gemma3_path, tmp_path / "served", max_bytes=100 * 10**6)
    assert len(shards) == 3
    rng = LayerRange(4, 12)
    with Server(shards) as srv:
        files = [RemoteFile(srv.url(p.name)) for p in shards]
        got = fetch_slice(files, rng, model_sha256=sha256_file(gemma3_path), progress=False)
        with pytest.raises(NakError, match="split into 3 files.*--model-sha256"):
            fetch_slice(files, LayerRange(0, 4), progress=False)
    want = cut_locally(gemma3_path, rng, tmp_path / "local-cache")
    assert got.path.read_bytes() == want.read_bytes()
    assert got.downloaded == pytest.approx(remote.download_bytes(shards[0], rng), rel=0.03, abs=3 * remote.HEAD_STEP)
    assert got.downloaded <= want.stat().st_size * 1.03 + 3 * remote.HEAD_STEP
