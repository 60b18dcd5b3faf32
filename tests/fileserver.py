"""`nak up`'s slice file server in a thread of the test process, for tests that fetch from it."""

from __future__ import annotations

import threading
from pathlib import Path

from nakshatra.cluster.fileserver import SliceFileServer


class FileServer:
    """A SliceFileServer in a thread of this process, on a free port (``sha256s``: name -> hex,
    sent as ETags)."""

    def __init__(self, folder: Path, names: list[str], key: bytes | None = None,
                 sha256s: dict[str, str] | None = None) -> None:
        self.srv = SliceFileServer(folder, names, "127.0.0.1", 0, key, sha256s)
        self.thread = threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.srv.server_address[1]}/slices/{name}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.srv.shutdown()
        self.srv.server_close()
        self.thread.join()
