"""The slice file server ``nak up`` starts when some stage runs on another host: read-only HTTP,
``GET /slices/NAME`` for the file names it was given and nothing else (404), byte ranges, the
sha256 as ETag, and with a cluster key a MAC of the file name in header :data:`AUTH_HEADER` on
every request (:func:`fetch_token`; else 403). :mod:`.fetch` is the other end.

``python -m nakshatra.cluster.fileserver --dir D --port P NAME ...`` runs it on its own.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..errors import NakError, SliceError
from ..gguf.manifest import sha256_file

DEFAULT_FILES_PORT = 7070
"""TCP port of the slice file server ``nak up`` starts when some stage runs on another host."""

AUTH_HEADER = "X-Nak-Fetch-Auth"
"""HTTP header carrying :func:`fetch_token` when the cluster has a key."""

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
"""A sha256 as lowercase hex."""


def fetch_token(key: bytes, name: str) -> str:
    """Hex HMAC-SHA256 under the cluster key of a slice's file name: the proof a download
    carries (header :data:`AUTH_HEADER`) when the cluster has a key. It is the same for every
    download of that file (nothing is secret in the transfer itself, which is not encrypted)."""
    return hmac.new(key, b"nakshatra-fetch-v1\0" + name.encode(), hashlib.sha256).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: SliceFileServer
    server_version = "nakshatra-files"

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        name = urllib.parse.unquote(path[len("/slices/"):]) if path.startswith("/slices/") else ""
        file = self.server.files.get(name)
        if file is None:
            self.send_error(404, "no such slice here", "this server offers only the slices of its cluster file")
            return
        if self.server.key is not None:
            got = self.headers.get(AUTH_HEADER, "")
            if not hmac.compare_digest(got.encode(), fetch_token(self.server.key, name).encode()):
                self.send_error(403, "cluster key required", "give the stage the cluster's --key-file")
                return
        try:
            f = open(file, "rb")
        except OSError as e:
            self.send_error(404, "slice missing", f"{file}: {e.strerror}")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            span = _byte_range(self.headers.get("Range", ""), size)
            if span == "unsatisfiable":
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = span if isinstance(span, tuple) else (0, size)
            self.send_response(206 if isinstance(span, tuple) else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            etag = self.server.etag(name)
            if etag:
                self.send_header("ETag", f'"{etag}"')
            if isinstance(span, tuple):
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if body and end > start:
                try:
                    self.wfile.flush()
                    self.connection.sendfile(f, start, end - start)
                except (BrokenPipeError, ConnectionResetError):
                    self.log_message("%s: client went away", name)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"nak files: {self.address_string()} {format % args}\n")
        sys.stderr.flush()


def _byte_range(header: str, size: int) -> tuple[int, int] | str | None:
    """The half-open byte range a ``Range`` header asks of a ``size``-byte file (RFC 9110 section
    14.1.2: ``bytes=a-b``, ``bytes=a-``, ``bytes=-n``; the end is clamped to the file), None for
    the whole file (no header, or one this server does not serve partially: several ranges, other
    units), ``"unsatisfiable"`` for a range that starts past the end."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or not (m.group(1) or m.group(2)):
        return None
    if not m.group(1):  # the last n bytes
        n = int(m.group(2))
        return (max(0, size - n), size) if n else "unsatisfiable"
    start = int(m.group(1))
    end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    if start >= size:
        return "unsatisfiable"
    return None if end <= start else (start, end)


class SliceFileServer(ThreadingHTTPServer):
    """A read-only HTTP server of some files of one folder: ``GET /slices/<name>`` for each name
    given, nothing else (404). With ``key``, a request must carry :func:`fetch_token` in header
    :data:`AUTH_HEADER` (else 403). ``port`` 0 picks a free port (``server_address`` tells).

    It answers single byte ranges (``Range: bytes=a-b``, 206), so a stage can fetch just its part
    of a whole model (:mod:`nakshatra.gguf.remote`), and sends each file's sha256 as its ETag
    where ``sha256s`` gives it (name -> hex)."""

    daemon_threads = True

    def __init__(self, folder: Path, names: Sequence[str], host: str = "127.0.0.1", port: int = 0,
                 key: bytes | None = None, sha256s: dict[str, str] | None = None) -> None:
        self.files = {n: Path(folder) / n for n in names if Path(n).name == n}
        self.key = key
        self._sha256s = dict(sha256s or {})
        self._etag_lock = threading.Lock()
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    def etag(self, name: str) -> str | None:
        """The hex sha256 of file ``name`` if it was given, else None."""
        return self._sha256s.get(name)


def _file_hashes(folder: Path, names: Sequence[str], given: Sequence[str]) -> dict[str, str]:
    """sha256 of each file: ``NAME=HEX`` as given, else hashed (a whole GGUF's remembered by path,
    size and mtime in the slice cache's index, as :func:`nakshatra.gguf.slicer.cached_slice` does).
    Raises NakError for a malformed ``NAME=HEX``."""
    out = {}
    for item in given:
        name, _, hexsum = item.partition("=")
        if not SHA256_HEX.match(hexsum.strip().lower()):
            raise NakError(f"--sha256 {item!r}: give NAME=HEX with a 64-digit hex sha256")
        out[name] = hexsum.strip().lower()
    for name in names:
        path = Path(folder) / name
        if name not in out and path.is_file():
            out[name] = _file_sha256(path)
    return out


def _file_sha256(path: Path) -> str:
    """sha256 of the file ``path``: remembered in the slice cache's index for a whole single-file
    GGUF (the identity :func:`nakshatra.gguf.slicer.cached_slice` keeps there is that hash), else
    hashed now."""
    from ..gguf.shards import open_model
    from ..gguf.slicer import _known_sha256, _locked
    from ..paths import cache_dir

    try:
        model = open_model(path)
    except SliceError:
        return sha256_file(path)
    if model.sharded:  # a shard's identity is the whole model's, not the file's
        return sha256_file(path)
    root = cache_dir() / "slices"
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        return _known_sha256(model, root / "index.json")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nakshatra.cluster.fileserver --dir DIR [--host H] [--port P] [--key-file K] NAME ...``:
    serve the named files until SIGTERM; prints ``{"host", "port", "pid"}`` as one JSON line when
    listening. Returns the exit status (1 when it cannot listen)."""
    from ..auth import load_key

    ap = argparse.ArgumentParser(prog="python -m nakshatra.cluster.fileserver",
                                 description="Serve slice files read-only over HTTP (GET /slices/NAME).")
    ap.add_argument("names", nargs="+", help="file names in --dir that may be fetched")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=DEFAULT_FILES_PORT)
    ap.add_argument("--key-file", default="", help="require fetch_token() under this cluster key (default: $NAK_KEY)")
    ap.add_argument("--sha256", action="append", default=[], metavar="NAME=HEX",
                    help="a file's sha256, sent as its ETag (files not given are hashed at start)")
    a = ap.parse_args(None if argv is None else list(argv))
    try:
        key = load_key(a.key_file or None)  # as the stages: the key file, else $NAK_KEY
        srv = SliceFileServer(a.dir, a.names, a.host, a.port, key, _file_hashes(a.dir, a.names, a.sha256))
    except (NakError, OSError) as e:
        print(f"nak files: error: cannot serve on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 1

    def on_term(signum: int, frame: object) -> None:
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    port = srv.server_address[1]
    print(json.dumps({"host": a.host, "port": port, "pid": os.getpid()}), flush=True)
    print(f"nak files: serving {', '.join(sorted(srv.files))} from {a.dir} on {a.host}:{port}"
          + (" (cluster key required)" if key else ""), file=sys.stderr, flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    print("nak files: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
