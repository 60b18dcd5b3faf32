"""`nak bench` runs the single process and the chain side by side and reports ratios (no timing
is asserted: speed goals are read from the benchmark, never enforced by tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_writes_single_chain_and_ratios(smollm2_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "bench", "--model", str(smollm2_path),
                        "--stages", "2", "--threads", "1", "--stage-threads", "1", "--reps", "1", "--n-decode", "8",
                        "--prompt-lens", "16,32", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for side in ("single", "chain"):
        assert set(res[side]["prefill_tps"]) == {"16", "32"}
        assert res[side]["decode_tps"]["median"] > 0
    chain = res["chain"]
    assert chain["hops"] == 2 and len(chain["stages"]) == 2
    assert all(s["peak_rss_bytes"] > 0 for s in chain["stages"])
    # a decode step moves one f32 hidden state per hop, plus framing
    assert 576 * 4 <= chain["wire_bytes_per_token_per_hop"]["median"] <= 2 * 576 * 4 + 400
    ratios = res["ratios"]
    assert ratios["decode_chain_over_single"] > 0
    assert ratios["prefill_chain_over_single"] == ratios["prefill16_chain_over_single"]
    assert "decode tok/s" in r.stdout and "chain / single" in r.stdout
