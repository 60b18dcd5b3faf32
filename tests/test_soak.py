"""`nak soak` in its short form: concurrent sessions, round after round, through 3 local stages;
with batching off every output equals its run alone, nothing fails, memory and file descriptors
do not grow after the first round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_soak_short(smollm2_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "soak", "--model", str(smollm2_path),
                        "--sessions", "4", "--tokens", "16", "--minutes", "0.2", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["ok"] and res["rounds"] >= 2
    assert res["sessions_completed"] == res["rounds"] * 4 and res["mismatches"] == 0 and not res["errors"]
    assert all(g <= 0 for g in res["fd_growth"]) and all(g <= 0.05 for g in res["rss_growth"])
