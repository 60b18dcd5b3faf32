"""The llama.cpp RPC baseline: upstream's rpc-server and llama-bench, built in the cached llama.cpp
tree, run the real model split over local servers (no timing is asserted)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nakshatra.bench import rpc_baseline
from nakshatra.errors import NakError


def _rpc_servers() -> set[int]:
    r = subprocess.run(["pgrep", "-x", rpc_baseline.RPC_SERVER], capture_output=True, text=True)
    return {int(p) for p in r.stdout.split()}


@pytest.mark.slow
def test_rpc_baseline_runs_and_stops_its_servers(smollm2_path: Path) -> None:
    before = _rpc_servers()
    res = rpc_baseline.run_rpc_baseline(smollm2_path, n_servers=2, threads=1, prompt_lens=(16,),
                                        n_decode=8, reps=1, progress=False)
    assert set(res["prefill_tps"]) == set(res["ttft_ms"]) == {"16"}
    assert res["prefill_tps"]["16"]["median"] > 0 and res["ttft_ms"]["16"]["median"] > 0
    assert res["decode_tps"]["median"] > 0 and res["decode_tps"]["n"] == 1
    assert res["servers"] == 2 and len(res["peak_rss_bytes"]) == 2
    assert all(b > 0 for b in res["peak_rss_bytes"])
    assert "--rpc" in res["command"] and "-ngl 99" in res["command"]
    assert _rpc_servers() <= before


def test_llama_bench_json_to_bench_shape() -> None:
    tests = [{"n_prompt": 128, "n_gen": 0, "samples_ts": [200.0, 240.0, 220.0],
              "samples_ns": [640e6, 533e6, 581e6]},
             {"n_prompt": 0, "n_gen": 64, "samples_ts": [30.0, 40.0], "samples_ns": [2.1e9, 1.6e9]}]
    res = rpc_baseline.parse_llama_bench(tests)
    assert res["prefill_tps"] == {"128": {"median": 220.0, "spread": 40.0, "n": 3}}
    assert res["ttft_ms"]["128"]["median"] == pytest.approx(581.0)
    assert res["decode_tps"] == {"median": 35.0, "spread": 10.0, "n": 2}
    with pytest.raises(NakError, match="no prefill or no decode"):
        rpc_baseline.parse_llama_bench(tests[:1])


def test_missing_build_tree_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(rpc_baseline, "build_info", lambda: {"llama_build_dir": str(tmp_path / "gone")})
    with pytest.raises(NakError, match="pip install"):
        rpc_baseline.ensure_tools()
