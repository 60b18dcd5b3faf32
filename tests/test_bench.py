"""`nak bench` runs the single process and the chain side by side and reports ratios (no timing
is asserted: speed goals are read from the benchmark, never enforced by tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("mode", ["relay", "forwarding", "ring"])
def test_bench_writes_single_chain_and_ratios(smollm2_path: Path, tmp_path: Path, mode: str) -> None:
    out = tmp_path / "bench.json"
    extra = (["--sessions", "2", "--wire", "bf16", "--link-delay-ms", "5"] if mode == "ring"
             else ["--sessions", "0", "--wire", ""] + (["--key"] if mode == "forwarding" else []))
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "bench", "--model", str(smollm2_path),
                        "--stages", "2", "--threads", "1", "--stage-threads", "1", "--reps", "1", "--n-decode", "8",
                        "--prompt-lens", "16,32", "--pairs", "2", "--json", str(out), "--mode", mode, *extra],
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for side in ("single", "chain"):
        assert set(res[side]["prefill_tps"]) == {"16", "32"}
        assert res[side]["decode_tps"]["median"] > 0
    chain = res["chain"]
    relay = mode == "relay"
    assert chain["hops"] == {"relay": 4, "forwarding": 3, "ring": 2}[mode] and len(chain["stages"]) == 2
    assert all(s["peak_rss_bytes"] > 0 and s["compute_ms_per_token"] > 0 for s in chain["stages"])
    # a decode step moves the boundary's f32 hidden state (576 floats) once with forwarding or a
    # ring, twice (in and out of the client) when relayed, plus framing
    per_token = chain["wire_bytes_per_token_per_hop"]["median"] * chain["hops"]
    hidden = 576 * 4 * (2 if relay else 1)
    assert hidden <= per_token <= hidden + 600
    ratios = res["ratios"]
    assert ratios["decode_chain_over_single"] > 0
    # interleaved: one ratio per pair, their median is the headline paired ratio
    paired = chain["paired"]
    assert len(paired["ratios"]) == 2 and paired["ratio"]["n"] == 2
    assert ratios["decode_chain_over_single_paired"] == pytest.approx(sorted(paired["ratios"])[0] / 2
                                                                      + sorted(paired["ratios"])[1] / 2)
    assert "interleaved" in r.stdout
    # the unsplit model with the stages' thread pool (workers sleeping between graphs), interleaved too
    assert paired["single_poll0_tps"]["n"] == 2 and paired["poll0_ratio"]["median"] > 0
    # where a chain's decode token goes, from the stages' own counters: each step's time at a stage
    # (arrival to frames ready) holds its llama_decode and lock wait, and more (wire decoding, framing)
    split = paired["split"]
    if relay:
        assert split == {}
    else:
        assert set(split) == {"llama_decode", "cpu_lock", "in_stages", "links"}
        assert split["llama_decode"]["median"] > 0 and split["cpu_lock"]["median"] >= 0
        assert split["in_stages"]["median"] > 0
        assert "where a decode token goes" in r.stdout
    assert ratios["prefill_chain_over_single"] == ratios["prefill16_chain_over_single"]
    assert "decode tok/s" in r.stdout and "chain / single" in r.stdout
    if mode == "forwarding":  # --key: the same chain with a cluster key, side by side
        keyed = res["chain_key"]
        assert keyed["decode_tps"]["median"] > 0 and "per_hop_us_key_minus_plain" in ratios
        # every frame carries a 16-byte MAC trailer
        assert keyed["wire_bytes_per_token_per_hop"]["median"] > chain["wire_bytes_per_token_per_hop"]["median"]
        assert "cluster key" in r.stdout
    else:
        assert "chain_key" not in res
    if mode == "ring":
        assert res["chain"]["sessions"]["2"]["aggregate_tps"]["median"] > 0 and "ratio_2_over_1" in res["chain"]["sessions"]
        wire = res["wire"]
        assert wire["f32"]["greedy_agreement"] == 1.0 and wire["f32"]["max_abs_diff"] == [0.0]
        assert wire["bf16"]["state_bytes_per_token"] == 576 * 2 and wire["bf16"]["max_abs_diff"][0] > 0
        links = res["links"]
        # every path pays at least the link delay of its hops (2 stages: 2 one-way links)
        assert links["ring_ms_per_token"]["median"] >= 2 * 5
        assert links["relay_ms_per_token"]["median"] >= 2 * 5
        assert "ratio_4_over_1" in links["sessions"] and "links_ring_over_expected" in res["ratios"]


def test_bench_synthetic_model_of_a_given_size(smollm2_path: Path, tmp_path: Path) -> None:
    from nakshatra.gguf.synthetic import parse_size

    assert parse_size("1.5B") == 1.5e9 and parse_size("300M") == 3e8
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "bench", "--synthetic", "40M", "--stages", "2",
                        "--threads", "1", "--reps", "1", "--n-decode", "4", "--prompt-lens", "8", "--no-repack",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert "synthetic-llama-40M" in res["config"]["model"]
    assert res["ratios"]["decode_chain_over_single"] > 0
    # --no-repack side by side: decode speed, and each stage's own memory (Q4_0 is repacked on
    # x86-64: without the copy the stages hold less of their own)
    assert res["ratios"]["decode_norepack_over_repack"] > 0
    assert 0 < res["ratios"]["own_memory_norepack_over_repack"] < 1
    assert all(st["rss_file_bytes"] > 0 and st["rss_anon_bytes"] > 0 for st in res["chain"]["stages"])
    assert "--no-repack" in r.stdout and "own memory" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "nakshatra_cli", "bench", "--synthetic", "lots"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert bad.returncode == 1 and "1.5B" in bad.stderr
