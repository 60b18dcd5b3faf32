"""Cut a slice of a remote model fetching only the bytes the slice needs (HTTP range requests).

A stage that serves layers ``a..b`` of a 40 GB model on another machine needs a few GB of it:
the header and metadata, the global tensors, its layers' tensors, and the input (first stage) or
output (last stage) tensors. :func:`fetch_slice` fetches exactly those byte ranges of the remote
GGUF into a *sparse local mirror* (a file of the remote's full size, same offsets, holes where
nothing was fetched), then cuts the slice from it with the ordinary slicer
(:mod:`nakshatra.gguf.slicer`), which reads nothing but those ranges. So the slice is byte for byte
the one ``nak slice`` cuts from the whole file, and the bytes fetched are the slice's size plus
at most one read window (1 MiB) of the head.

- **Head**: read in growing windows until :func:`nakshatra.gguf.scan.scan` parses the
  key-value pairs and tensor infos within what is there (``scan(path, head=n)``).
- **Resumable**: each mirror has a record, ``<mirror>.fetch.json`` (the URL, the remote size,
  its validator: ETag or Last-Modified, and the byte intervals already there), updated every
  8 MiB; an interrupted fetch continues where it stopped. A remote file whose size or validator
  changed is fetched again from nothing. A transfer that breaks is resumed from its last byte
  (given up after :data:`ATTEMPTS` breaks in a row that brought nothing).
- **Checked**: the model's sha256 (``nakshatra.model_sha256`` in the slice, what stages compare
  to know they serve one model) is given (``--model-sha256``), or known from the remote (a
  Hugging Face file URL's ``X-Linked-Etag``, its LFS sha256; or an ETag that is a sha256, as
  ``nak up``'s file server sends). With
  the slice's expected sha256 (``--sha256``) the cut slice must match it, or the slice and the
  whole mirror are deleted: a bad download is never kept.
- **Where**: mirrors live in ``cache_dir()/remote/<sha256 of the URL>[:16]/`` and are deleted
  once the slice is cut; the slice goes where :func:`nakshatra.gguf.slicer.cached_slice` would put a
  slice of the local file (``cache_dir()/slices/<model sha256>[:16]/<stem>.<a>-<b>.gguf``), so
  a second start fetches nothing.

HTTP: ``urllib`` (standard library): ``Range: bytes=a-b`` must be answered ``206`` with a
``Content-Range`` (RFC 9110 section 14); a server that answers ``200`` does not do ranges and is
refused (nothing is downloaded whole behind the user's back).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NakError, SliceError
from ..paths import cache_dir
from ..ranges import LayerRange
from .manifest import CHUNK, sha256_file, write_atomic
from .scan import GGUFScan, Truncated, scan
from .slicer import _locked

HEAD_STEP = 1 << 20
"""Bytes of the head fetched at a time while looking for the end of the tensor infos."""

RECORD_EVERY = 8 << 20
"""Bytes fetched between two updates of a mirror's ``.fetch.json`` record."""

ATTEMPTS = 3
"""Transfers in a row that may break before bringing a byte: each is resumed from its last byte
(after 1, 2, 4 ... s); one that brought bytes starts the count again."""

MERGE_GAP = 64 << 10
"""Intervals closer than this are fetched as one request (the gap is alignment padding or a
small tensor: cheaper than another round trip)."""

TIMEOUT_S = 30.0
"""Seconds without progress before a request is given up (then retried, see ATTEMPTS)."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class RemoteFile:
    """One remote GGUF: its ``url``, request ``headers`` (auth), and what is known of it before
    asking: ``size`` (bytes) and ``sha256`` (hex of the whole file), None when unknown."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    size: int | None = None
    sha256: str | None = None

    @property
    def name(self) -> str:
        """The file name: the last segment of the URL's path."""
        return urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1])


def is_url(text: str | os.PathLike[str]) -> bool:
    """True for an ``http://`` or ``https://`` URL."""
    return str(text).startswith(("http://", "https://"))


# ---- byte intervals ----------------------------------------------------------------------------

def merge_intervals(spans: list[tuple[int, int]], gap: int = 0) -> list[tuple[int, int]]:
    """Half-open ``[start, end)`` intervals sorted and merged where they overlap or lie less than
    ``gap`` bytes apart; empty ones dropped."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def missing_intervals(want: list[tuple[int, int]], have: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of the (merged) intervals ``want`` not covered by the (merged) intervals ``have``."""
    out = []
    for a, b in want:
        for c, d in have:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return out


# ---- one sparse mirror -------------------------------------------------------------------------

class _Mirror:
    """A sparse local copy of one remote file and its record (see the module docstring).
    ``fetched`` counts the bytes received over the network by this object."""

    def __init__(self, rf: RemoteFile, path: Path, on_bytes: Callable[[int], Any]) -> None:
        self.rf, self.path, self.on_bytes = rf, path, on_bytes
        self.record_path = path.with_name(path.name + ".fetch.json")
        self.size: int | None = None
        self.validator = ""
        self.sha256: str | None = rf.sha256.lower() if rf.sha256 else None
        self.have: list[tuple[int, int]] = []
        self.fetched = 0
        self._since_record = 0

    # -- record
    def _load(self) -> None:
        try:
            rec = json.loads(self.record_path.read_text(encoding="utf-8"))
            if rec.get("url") == self.rf.url and self.path.is_file():
                self.size, self.validator = int(rec["size"]), str(rec.get("validator", ""))
                self.have = merge_intervals([(int(a), int(b)) for a, b in rec["have"]])
                self.sha256 = self.sha256 or rec.get("sha256")
                if self.path.stat().st_size == self.size:
                    return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.size, self.validator, self.have = None, "", []

    def _save(self) -> None:
        self._since_record = 0
        write_atomic(self.record_path, json.dumps({"url": self.rf.url, "size": self.size,
                                                   "validator": self.validator, "sha256": self.sha256,
                                                   "have": self.have}))

    def discard(self) -> None:
        """Delete the mirror and its record."""
        self.path.unlink(missing_ok=True)
        self.record_path.unlink(missing_ok=True)
        self.have = []

    # -- HTTP
    def _open(self, start: int, end: int) -> Any:
        """A response streaming bytes ``[start, end)``; checks it is that range of the file the
        record describes. Raises NakError naming the URL and the fix."""
        headers = dict(self.rf.headers)
        headers["Range"] = f"bytes={start}-{end - 1}"
        headers["Accept-Encoding"] = "identity"
        redirects = _Redirects()
        try:
            resp = urllib.request.build_opener(redirects).open(urllib.request.Request(self.rf.url, headers=headers),
                                                               timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            e.close()
            raise NakError(_http_error(self.rf.url, e.code, str(e.reason))) from None
        if resp.status != 206:
            resp.close()
            raise NakError(f"{self.rf.url}: the server does not answer range requests (HTTP {resp.status} to "
                           "a Range request), so only the whole file could be downloaded; serve the file "
                           "from a server that supports ranges (`nak up`'s file server does) or download it "
                           "and give the local path")
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        # a range past the end of the file is answered up to the last byte (RFC 9110 14.1.1)
        if (not m or m.group(3) == "*" or int(m.group(1)) != start
                or int(m.group(2)) != min(end, int(m.group(3))) - 1):
            resp.close()
            raise NakError(f"{self.rf.url}: asked for bytes {start}-{end - 1}, the server answered "
                           f"Content-Range {resp.headers.get('Content-Range')!r}; the server's range "
                           "support is broken: download the whole file and give the local path")
        size = int(m.group(3))
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified") or ""
        if self.size is None:
            self._start(size, validator, redirects.linked_etag or resp.headers.get("ETag") or "")
        elif size != self.size or (self.validator and validator and validator != self.validator):
            resp.close()
            self.discard()
            raise NakError(f"{self.rf.url} changed on the server while it was being fetched (size or "
                           "ETag differs); the partial copy is deleted: run the command again")
        return resp

    def _start(self, size: int, validator: str, etag: str) -> None:
        """A new mirror of a ``size``-byte remote file: an empty sparse file of that size."""
        if self.rf.size is not None and self.rf.size != size:
            raise NakError(f"{self.rf.url} has {size} bytes, not the {self.rf.size} its listing says; "
                           "the file changed: run the command again")
        tag = etag.strip().removeprefix("W/").strip('"').lower()
        if self.sha256 is None and _SHA256.match(tag):
            self.sha256 = tag
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as f:
            f.truncate(size)
        self.size, self.validator, self.have = size, validator, []
        self._save()

    def _pull(self, start: int, end: int) -> None:
        """Fetch ``[start, end)`` into the mirror; a transfer that breaks is resumed from its last
        byte, giving up after ATTEMPTS breaks in a row that brought nothing."""
        failures = 0
        while True:
            assert self.size is None or start < self.size
            todo = missing_intervals([(start, end if self.size is None else min(end, self.size))], self.have)
            if not todo:
                return
            before = self.fetched
            try:
                self._stream(*todo[0])
                continue
            except (OSError, http.client.HTTPException) as e:
                failures = 1 if self.fetched > before else failures + 1
                if failures >= ATTEMPTS:
                    reason = getattr(e, "reason", e)
                    raise NakError(f"{self.rf.url}: cannot fetch bytes {todo[0][0]}-{todo[0][1] - 1} ({reason}); "
                                   "what arrived is kept: run the command again to continue") from None
            time.sleep(2 ** min(failures - 1, 3))

    def _stream(self, pos: int, end: int) -> int:
        resp = self._open(pos, end)
        assert self.size is not None
        end = min(end, self.size)
        with resp, open(self.path, "r+b") as out:
            try:
                while pos < end:
                    chunk = resp.read(min(CHUNK, end - pos))
                    if not chunk:
                        raise OSError(f"the server closed the transfer at byte {pos}")
                    os.pwrite(out.fileno(), chunk, pos)
                    self._mark(pos, pos + len(chunk))
                    pos += len(chunk)
            finally:
                self._save()
        return pos

    def _mark(self, a: int, b: int) -> None:
        self.have = merge_intervals(self.have + [(a, b)])
        self.fetched += b - a
        self._since_record += b - a
        self.on_bytes(b - a)
        if self._since_record >= RECORD_EVERY:
            self._save()

    # -- what callers use
    def ensure(self, spans: list[tuple[int, int]]) -> None:
        """Make the byte intervals ``spans`` present in the mirror, fetching what is missing."""
        for a, b in missing_intervals(merge_intervals(spans, MERGE_GAP), self.have):
            self._pull(a, b)

    def missing(self, spans: list[tuple[int, int]]) -> int:
        """Bytes of ``spans`` not in the mirror yet (what :meth:`ensure` would fetch)."""
        return sum(b - a for a, b in missing_intervals(merge_intervals(spans, MERGE_GAP), self.have))

    def head(self) -> GGUFScan:
        """The scanned GGUF header, metadata and tensor infos, fetching the head as far as they go.
        Raises SliceError if the remote file is not a GGUF."""
        self._load()
        if self.size is None:
            self._pull(0, HEAD_STEP)
        assert self.size is not None
        while True:
            have = self.have[0][1] if self.have and self.have[0][0] == 0 else 0
            try:
                return scan(self.path, head=have)
            except Truncated as e:
                if have >= self.size:
                    raise SliceError(f"{self.rf.url} is not a GGUF file (or it is truncated): {e}") from None
                self.ensure([(have, min(self.size, max(e.needed, have + HEAD_STEP)))])
            except ValueError as e:
                raise SliceError(f"{self.rf.url} is not a GGUF file: {e}; give the URL of a .gguf model") from None


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects (keeping Range and auth headers, as urllib does) and keeps the
    ``X-Linked-Etag`` a Hugging Face file URL's redirect carries: the file's sha256, which the
    storage server the redirect leads to does not send."""

    linked_etag: str | None = None

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        self.linked_etag = headers.get("X-Linked-Etag") or self.linked_etag
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_error(url: str, code: int, reason: str) -> str:
    if code in (401, 403):
        why = ("the server wants credentials: for a Hugging Face repo set HF_TOKEN (or run `hf auth login`); "
               "for `nak up`'s file server pass the cluster's --key-file")
    elif code == 404:
        why = "no such file there: check the URL"
    elif code == 416:
        why = "the server says the range is outside the file: the file changed, run the command again"
    else:
        why = reason
    return f"{url}: HTTP {code}: {why}"


# ---- the slice --------------------------------------------------------------------------------

def _mirror_dir(url: str) -> Path:
    import hashlib

    return cache_dir() / "remote" / hashlib.sha256(url.encode()).hexdigest()[:16]


@contextmanager
def _bar(progress: bool, description: str, total: int | None = None) -> Iterator[Callable[[int], Any]]:
    """A byte progress bar on stderr (``total`` bytes, None: unknown); yields ``advance(n)``."""
    if not progress:
        yield lambda n: None
        return
    from .slicer import byte_progress

    with byte_progress(True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def download_bytes(model_path: str | os.PathLike[str], rng: LayerRange) -> int:
    """Bytes :func:`fetch_slice` downloads for layers ``rng`` of the model at ``model_path`` (a
    file or any shard; none of it there yet): each file's head and the data of the tensors the
    slice keeps (:func:`nakshatra.gguf.slicer.slice_byte_ranges`), merged as they are fetched. Raises
    SliceError / RangeError as that function."""
    from .slicer import slice_byte_ranges

    return sum(b - a for spans in slice_byte_ranges(model_path, [rng]).values()
               for a, b in merge_intervals([(o, o + n) for o, n in spans], MERGE_GAP))


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch_slice` made: the slice ``path``, the model's ``model_sha256`` (hex) and
    the bytes ``downloaded`` from the network this time (0 when the slice was cached)."""

    path: Path
    model_sha256: str
    downloaded: int


def _slice_path(model_sha: str, stem: str, rng: LayerRange) -> Path:
    """Where :func:`nakshatra.gguf.slicer.cached_slice` puts that slice of a local copy of the model."""
    return cache_dir() / "slices" / model_sha[:16] / f"{stem}.{rng.inclusive()}.gguf"


def fetch_slice(files: RemoteFile | Sequence[RemoteFile], rng: LayerRange, *, model_sha256: str | None = None,
                sha256: str | None = None, progress: bool | None = None) -> Fetched:
    """The slice of layers ``rng`` (global, half-open) of the remote GGUF ``files`` (one file, or
    every shard of a split model in order), fetching only its bytes (see the module docstring)
    and reusing a slice already cut.

    ``model_sha256``: hex identity of the model (:func:`nakshatra.gguf.shards.model_sha256`: the sha256
    of the whole file) when the remote cannot tell it: a single file's comes from the remote when
    it says (``RemoteFile.sha256``, a sha256 ETag), a split model's needs the whole model and so
    must be given. ``sha256``: the expected sha256 of the slice file (what ``nak up`` prints): a
    mismatch deletes the slice and the fetched bytes. ``progress``: byte progress bars on stderr
    (default: when stderr is a terminal).

    Raises NakError (HTTP, range support, unknown or contradicting identity, mismatch, a file that
    changed while fetched) or SliceError / RangeError (not a GGUF, shards that do not belong
    together, not sliceable, range beyond the model), each naming the URL or file and the fix.
    """
    from .shards import open_model
    from .slicer import _model_layout, cached_slice, slice_byte_ranges

    files = [files] if isinstance(files, RemoteFile) else list(files)
    progress = sys.stderr.isatty() if progress is None else progress
    want_model = _hex(model_sha256, "--model-sha256")
    want_slice = _hex(sha256, "--sha256")
    listed = _hex(files[0].sha256, "the remote file's sha256") if len(files) == 1 else None
    if want_model and listed and want_model != listed:
        raise NakError(f"{files[0].url}: its sha256 is {listed}, not the --model-sha256 {want_model} given; "
                       "check which file you meant")
    first = want_model or listed
    if len(files) == 1 and first:
        out = _slice_path(first, Path(files[0].name).stem, rng)
        if _reuse(out, first, rng, want_slice):
            return Fetched(out, first, 0)
    mdir = _mirror_dir(files[0].url)
    mdir.mkdir(parents=True, exist_ok=True)
    with _locked(mdir / ".lock"):
        with _bar(progress, f"reading the header of {files[0].name}") as advance:
            mirrors = [_Mirror(rf, mdir / rf.name, advance) for rf in files]
            for m in mirrors:
                m.head()
        model = open_model(mirrors[0].path)
        msha = _identity(files, mirrors, want_model)
        out = _slice_path(msha, model.stem, rng)
        if _reuse(out, msha, rng, want_slice):
            return Fetched(out, msha, sum(m.fetched for m in mirrors))
        spans = {p.name: [(o, o + n) for o, n in v] for p, v in slice_byte_ranges(mirrors[0].path, [rng]).items()}
        todo = sum(m.missing(spans.get(m.path.name, [])) for m in mirrors)
        with _bar(progress, f"fetching layers {rng.inclusive()} of {model.stem}", todo) as advance:
            for m in mirrors:
                m.on_bytes = advance
                m.ensure(spans.get(m.path.name, []))
        n_layer = _model_layout(model, msha).n_layer
        got = cached_slice(mirrors[0].path, rng, n_layer, progress, sha256=msha)
        fetched = sum(m.fetched for m in mirrors)
        if want_slice and sha256_file(got) != want_slice:
            got.unlink(missing_ok=True)
            for m in mirrors:
                m.discard()
            raise NakError(f"{files[0].url}: the slice cut from the fetched bytes does not have the sha256 "
                           f"{want_slice} given; deleted it and the fetched bytes. The remote file is not "
                           "the one the slice was planned from (or the transfer was corrupted): check the "
                           "URL and run the command again")
        for m in mirrors:
            m.discard()
        return Fetched(got, msha, fetched)


def _identity(files: list[RemoteFile], mirrors: list[_Mirror], given: str | None) -> str:
    """The model's identity: as given, else a single file's sha256 from the remote. Raises
    NakError when neither is known, or the remote's contradicts the one given."""
    known = mirrors[0].sha256 if len(mirrors) == 1 else None
    if given and known and given != known:
        raise NakError(f"{files[0].url}: its sha256 is {known}, not the --model-sha256 {given} given; "
                       "check which file you meant")
    if given or known:
        return str(given or known)
    if len(files) > 1:
        raise NakError(f"{files[0].url} is split into {len(files)} files: the model's sha256 (that of the "
                       "model as one file, what every stage compares) needs all of it; pass --model-sha256 HEX, "
                       "the model.sha256 in the manifest `nak slice` writes where the whole model is")
    raise NakError(f"{files[0].url}: the server does not say the file's sha256 (no sha256 ETag); pass "
                   "--model-sha256 HEX (sha256sum of the file where it lives) so that every stage knows "
                   "they serve one model")


def _reuse(path: Path, model_sha: str, rng: LayerRange, want: str | None) -> bool:
    """True if ``path`` is already the slice wanted (verified); a wrong one is deleted."""
    from .slicer import read_slice_meta, verify_slice

    if not path.is_file():
        return False
    try:
        meta = read_slice_meta(path)
        if (meta["nakshatra.model_sha256"] == model_sha
                and meta["nakshatra.layer_range_start"] == rng.start
                and meta["nakshatra.layer_range_end"] == rng.end and verify_slice(path)
                and (want is None or sha256_file(path) == want)):
            return True
    except SliceError:
        pass
    path.unlink(missing_ok=True)
    return False


def _hex(value: str | None, flag: str) -> str | None:
    if not value:
        return None
    v = value.strip().lower()
    if not _SHA256.match(v):
        raise NakError(f"{flag} {value!r} is not a sha256 (64 hex digits)")
    return v
