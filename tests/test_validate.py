"""Chain validation (nakshatra.client.chain.validate_chain) on handshake data: every malformed chain is
refused with a message naming the stage at fault."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, strategies as st

from nakshatra.client.chain import StageInfo, parse_stage_address, validate_chain
from nakshatra.errors import ChainError
from nakshatra.ranges import LayerRange


def stage(port: int, a: int, b: int, sha: str = "m" * 64, n_full: int = 30, n_embd: int = 576) -> StageInfo:
    return StageInfo("127.0.0.1", port, LayerRange(a, b), n_full, n_embd, 49152, sha, "llama", "cpu", {})


def test_any_order_is_sorted() -> None:
    parts = [stage(1, 0, 7), stage(2, 7, 20), stage(3, 20, 30)]
    for perm in itertools.permutations(parts):
        assert [s.port for s in validate_chain(list(perm))] == [1, 2, 3]


@pytest.mark.parametrize("stages, match", [
    ([stage(1, 0, 7), stage(2, 9, 30)], r"no stage serves layers 7-8 .*127.0.0.1:2"),
    ([stage(1, 0, 10), stage(2, 8, 30)], r"127.0.0.1:2 \(layers 8-29 .*overlaps 127.0.0.1:1"),
    ([stage(1, 2, 30)], r"no stage serves layers 0-1"),
    ([stage(1, 0, 20)], r"no stage serves layers 20-29 .*127.0.0.1:1"),
    ([stage(1, 0, 10), stage(2, 10, 30, sha="x" * 64)], r"127.0.0.1:2 serves another model"),
    ([stage(1, 0, 10), stage(2, 10, 30, n_full=32)], r"127.0.0.1:2 serves another model"),
    ([stage(1, 0, 10), stage(2, 10, 30, n_embd=640)], r"127.0.0.1:2 has n_embd 640"),
    ([stage(1, 0, 10), stage(2, 0, 10), stage(3, 10, 30)], r"a path takes one stage per range"),
    ([], r"empty"),
])
def test_malformed_chains_are_refused(stages, match: str) -> None:
    with pytest.raises(ChainError, match=match):
        validate_chain(stages)


@given(st.lists(st.integers(min_value=1, max_value=29), unique=True, max_size=8), st.randoms())
def test_every_exact_cover_is_accepted(cuts: list[int], rnd) -> None:
    bounds = [0, *sorted(cuts), 30]
    parts = [stage(i + 1, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    rnd.shuffle(parts)
    out = validate_chain(parts)
    assert [s.layers.start for s in out] == bounds[:-1]


@pytest.mark.parametrize("text, want", [("127.0.0.1:7071", ("127.0.0.1", 7071)), ("[::1]:80", ("::1", 80)),
                                        ("host-a:1", ("host-a", 1))])
def test_parse_stage_address(text: str, want) -> None:
    assert parse_stage_address(text) == want


@pytest.mark.parametrize("text", ["nohost", "h:", ":80", "h:0", "h:70000", "h:x"])
def test_parse_stage_address_errors(text: str) -> None:
    with pytest.raises(ChainError, match="host:port"):
        parse_stage_address(text)
