"""Child processes the package starts and owns (local stages, link-delay relays): stopping them.

(``nak up``'s detached processes, which outlive the command, are ``cluster/processes.py``'s.)
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence


def stop_all(procs: Sequence[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM every process still running, wait for all of them up to ``timeout_s`` seconds in
    all, SIGKILL (and reap) those still running then, and close their stdout pipes."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout is not None:
            p.stdout.close()
