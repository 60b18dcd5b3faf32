"""Fetching a slice from the slice file server of another host (``nak serve --fetch URL --sha256 HEX``):
into a temporary file beside the destination, checked against its sha256 (and as a slice), then
renamed, so a failed or partial download never leaves a file that looks whole.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import NakError, SliceError
from ..gguf.manifest import CHUNK, sha256_file
from .fileserver import AUTH_HEADER, SHA256_HEX, fetch_token


class _FetchFailed(Exception):
    pass


def _progress_bar(enabled: bool) -> Any:
    """The slicer's byte progress bar (stderr), or None when ``enabled`` is false."""
    from ..gguf.slicer import byte_progress

    return byte_progress(enabled) if enabled else None


def _download_slice(url: str, dest: Path, want: str, key: bytes | None, progress: bool) -> None:
    """Fetch ``url`` into a temporary file beside ``dest``, check it, rename it to ``dest``;
    raises _FetchFailed naming the URL and the fix (the temporary file is deleted)."""
    from ..gguf.slicer import verify_slice

    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    headers = {AUTH_HEADER: fetch_token(key, name)} if key else {}
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 403:
                why = ("this stage's cluster key is not the one the server has" if key else
                       "the server needs the cluster key") + "; pass the cluster's --key-file (or set NAK_KEY)"
            elif e.code == 404:
                why = "that server offers no such slice; copy the URL from `nak up`'s output again"
            else:
                why = f"{e.reason}"
            raise _FetchFailed(f"{url}: refused ({e.code}): {why}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise _FetchFailed(f"{url}: cannot connect ({reason}): is `nak up` running on that host, and its "
                               "--files-port reachable from here?") from None
        with resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            h = hashlib.sha256()
            n = 0
            bar = _progress_bar(progress)
            try:
                if bar is not None:
                    bar.start()
                    task = bar.add_task(f"fetching {dest.name}", total=total)
                with open(tmp, "wb") as out:
                    while True:
                        try:
                            chunk = resp.read(CHUNK)
                        except OSError as e:
                            raise _FetchFailed(f"{url}: the transfer broke after {n} bytes ({e}); run the "
                                               "command again") from None
                        if not chunk:
                            break
                        out.write(chunk)
                        h.update(chunk)
                        n += len(chunk)
                        if bar is not None:
                            bar.advance(task, len(chunk))
            finally:
                if bar is not None:
                    bar.stop()
        if total is not None and n != total:
            raise _FetchFailed(f"{url}: got {n} of {total} bytes; run the command again")
        got = h.hexdigest()
        if got != want:
            raise _FetchFailed(f"{url}: the downloaded file's sha256 is {got}, not the {want} given with --sha256; "
                               "deleted it. The slice on the serving host was re-made or replaced: run `nak up` "
                               "there again and use the command it prints now")
        try:
            verify_slice(tmp)
        except SliceError as e:
            raise _FetchFailed(f"{url}: the file has the expected sha256 but fails its own check ({e}); deleted it. "
                               "The serving host's slice is damaged: delete it there and run `nak up` again "
                               "to re-make it") from None
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_slice(urls: Sequence[str], dest: Path | str, sha256: str, key: bytes | None = None,
                progress: bool | None = None) -> bool:
    """Make sure ``dest`` is the slice of hex whole-file ``sha256``, fetching it if missing.

    If ``dest`` exists it must have that sha256 (else NakError: remove it to fetch the new one).
    If it is missing, each URL of ``urls`` is tried in order (mirrors): the file is streamed
    into ``.<name>.<pid>.part`` beside ``dest`` (a Rich progress bar on stderr when ``progress``,
    default: stderr is a terminal), its sha256 must equal ``sha256`` and its tensor data its own
    metadata (:func:`nakshatra.gguf.slicer.verify_slice`); then it is renamed to ``dest``. A failed
    download leaves nothing behind. ``key``: the cluster key, when the file server requires it.
    Returns True if it fetched the file, False if ``dest`` was already there. Raises NakError
    naming each URL tried, what went wrong and what to do.
    """
    want = sha256.strip().lower()
    if not want:
        raise NakError("--fetch needs --sha256 HEX, the slice file's sha256 (`nak up` prints the whole command)")
    if not SHA256_HEX.match(want):
        raise NakError(f"--sha256 {sha256!r} is not a sha256 (64 hex digits); copy it from `nak up`'s output")
    dest = Path(dest)
    if dest.exists():
        got = sha256_file(dest)
        if got != want:
            raise NakError(f"{dest} exists but its sha256 is {got}, not {want}: it is another or an older slice; "
                           "delete it (it is then fetched again) or give another path")
        return False
    if not urls:
        raise NakError(f"{dest}: no such file; give --fetch URL to fetch it")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NakError(f"cannot create {dest.parent}: {e.strerror or e}; give a slice path in a writable folder") \
            from None
    if progress is None:
        progress = sys.stderr.isatty()
    errors = []
    for url in urls:
        try:
            _download_slice(url, dest, want, key, progress)
            print(f"nak serve: fetched {dest} from {url} ({dest.stat().st_size / 2**20:.1f} MiB, sha256 ok)",
                  file=sys.stderr, flush=True)
            return True
        except _FetchFailed as e:
            errors.append(str(e))
    raise NakError(f"cannot fetch {dest}: " + "; ".join(errors))
