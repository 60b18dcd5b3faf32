from __future__ import annotations

import itertools
from itertools import pairwise

import pytest
from hypothesis import given, settings, strategies as st

from nakshatra.errors import RangeError
from nakshatra.ranges import LayerRange, check_cover, parse_range, parse_ranges, plan_parts, stage_bytes


def test_layer_range_forms():
    r = LayerRange(0, 7)
    assert r.n_layers == 7
    assert str(r) == "0-6 (7 layers)"
    assert r.inclusive() == "0-6"
    assert str(LayerRange(5, 6)) == "5-5 (1 layer)"
    assert sorted([LayerRange(7, 9), LayerRange(0, 7)]) == [LayerRange(0, 7), LayerRange(7, 9)]


@pytest.mark.parametrize("start,end", [(-1, 3), (3, 3), (4, 2)])
def test_layer_range_rejects_empty_or_negative(start, end):
    with pytest.raises(RangeError):
        LayerRange(start, end)


def test_parse_range_is_inclusive():
    assert parse_range("0-15") == LayerRange(0, 16)
    assert parse_range(" 5 - 5 ") == LayerRange(5, 6)
    assert parse_range("7") == LayerRange(7, 8)


@pytest.mark.parametrize("text,needle", [
    ("abc", "malformed"), ("1-", "malformed"), ("1-2-3", "malformed"), ("", "malformed"),
    ("-1-4", "negative"), ("3--1", "negative"), ("9-7", "write 7-9"),
])
def test_parse_range_errors(text, needle):
    with pytest.raises(RangeError, match=needle):
        parse_range(text)


def test_parse_ranges_sorts_and_validates():
    assert parse_ranges("17-25,0-6,26-29,7-16", 30) == [
        LayerRange(0, 7), LayerRange(7, 17), LayerRange(17, 26), LayerRange(26, 30)]
    assert parse_ranges("0-29", 30) == [LayerRange(0, 30)]


@pytest.mark.parametrize("text,needles", [
    ("0-6,10-29", ["layers 7-9 are in no range", "0-6", "10-29"]),
    ("0-6,8-29", ["layer 7 is in no range"]),
    ("0-7,5-29", ["overlap", "layers 5-7"]),
    ("3-29", ["layers 0-2 are in no range", "start at layer 0"]),
    ("0-20", ["layers 21-29 are in no range", "end at layer 29"]),
    ("0-30", ["beyond the model", "30 layers", "0..29"]),
    ("0-6,,7-29", ["malformed"]),
    ("0-6;7-29", ["malformed"]),
    ("0-6,x", ["malformed", "'x'"]),
    ("7-0", ["write 0-7"]),
])
def test_parse_ranges_errors(text, needles):
    with pytest.raises(RangeError) as e:
        parse_ranges(text, 30)
    for needle in needles:
        assert needle in str(e.value)


def test_check_cover_empty():
    with pytest.raises(RangeError, match="no layer ranges"):
        check_cover([], 4)


# --- plan_parts --------------------------------------------------------------------------------

def brute_force(layer_bytes, n_parts, first, last):
    """All ways to cut: (largest stage, ends) for each, the reference for plan_parts."""
    n = len(layer_bytes)
    out = []
    for cuts in itertools.combinations(range(1, n), n_parts - 1):
        bounds = (0, *cuts, n)
        ranges = [LayerRange(a, b) for a, b in pairwise(bounds)]
        out.append((max(stage_bytes(ranges, layer_bytes, first, last)), [r.end for r in ranges]))
    return out


inputs = st.integers(1, 8).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 50), min_size=n, max_size=n), st.integers(1, n),
    st.integers(0, 120), st.integers(0, 120)))


@settings(max_examples=400, deadline=None)
@given(inputs)
def test_plan_parts_is_optimal_cover(args):
    layer_bytes, n_parts, first, last = args
    plan = plan_parts(layer_bytes, n_parts, first, last)
    assert len(plan) == n_parts
    assert plan[0].start == 0 and plan[-1].end == len(layer_bytes)
    assert all(a.end == b.start for a, b in pairwise(plan))
    assert all(r.n_layers >= 1 for r in plan)
    assert check_cover(plan, len(layer_bytes)) == plan
    got = max(stage_bytes(plan, layer_bytes, first, last))
    candidates = brute_force(layer_bytes, n_parts, first, last)
    best = min(c[0] for c in candidates)
    assert got == best
    # documented tie rule: lexicographically smallest ends among optimal splits
    assert [r.end for r in plan] == min(ends for cost, ends in candidates if cost == best)
    assert plan_parts(list(layer_bytes), n_parts, first, last) == plan


def test_plan_parts_balances_real_shapes():
    # 30 equal layers, a big tied embedding on both ends: the end stages get fewer layers
    plan = plan_parts([100] * 30, 3, 1000, 1000)
    # optimum 1700 = ceil(5000 / 3) rounded up to a layer; earliest ends among optimal splits
    assert plan == [LayerRange(0, 6), LayerRange(6, 23), LayerRange(23, 30)]
    assert stage_bytes(plan, [100] * 30, 1000, 1000) == [1600, 1700, 1700]
    assert plan_parts([5, 5, 5, 5], 2) == [LayerRange(0, 2), LayerRange(2, 4)]
    assert plan_parts([0, 0, 0], 3) == [LayerRange(0, 1), LayerRange(1, 2), LayerRange(2, 3)]


@pytest.mark.parametrize("layer_bytes,n_parts", [([1, 2, 3], 0), ([1, 2, 3], 4), ([], 1), ([1], -1)])
def test_plan_parts_bad_part_counts(layer_bytes, n_parts):
    with pytest.raises(RangeError, match="cannot split"):
        plan_parts(layer_bytes, n_parts, 0, 0)


def test_plan_parts_negative_bytes():
    with pytest.raises(RangeError, match=">= 0"):
        plan_parts([1, -2], 1, 0, 0)
