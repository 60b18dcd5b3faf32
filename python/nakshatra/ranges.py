"""Layer ranges: parsing the user's inclusive ``0-6,7-16`` syntax, checking that ranges cover a
model exactly, and planning a byte-balanced split.

Inside the code a :class:`LayerRange` is global and HALF-OPEN, ``[start, end)``; only text meant for
people (parsing, ``str``) is inclusive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

from .errors import RangeError

_ITEM = re.compile(r"^(-?\d+)(?:-(-?\d+))?$")


@dataclass(frozen=True, order=True)
class LayerRange:
    """Global layers ``start .. end-1`` of a model (half-open). Raises RangeError if
    ``start < 0`` or ``end <= start``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise RangeError(f"invalid layer range [{self.start}, {self.end}): need 0 <= start < end")

    @property
    def n_layers(self) -> int:
        """Number of layers in the range."""
        return self.end - self.start

    def inclusive(self) -> str:
        """The inclusive form people write, e.g. ``"0-6"`` for ``LayerRange(0, 7)``."""
        return f"{self.start}-{self.end - 1}"

    def __str__(self) -> str:
        n = self.n_layers
        return f"{self.inclusive()} ({n} layer{'' if n == 1 else 's'})"


def _span(start: int, end_incl: int) -> str:
    return f"layer {start}" if start == end_incl else f"layers {start}-{end_incl}"


def _in_no_range(start: int, end_incl: int) -> str:
    return f"{_span(start, end_incl)} {'is' if start == end_incl else 'are'} in no range"


def parse_range(text: str) -> LayerRange:
    """Parse one inclusive range, ``"0-15"`` -> ``LayerRange(0, 16)``; ``"5"`` is ``"5-5"``.

    Raises RangeError (naming the text and the fix) if it is malformed, negative, or start > end.
    """
    item = text.strip().replace(" ", "")
    m = _ITEM.match(item)
    if not m:
        raise RangeError(f"malformed layer range {text!r}: write it as START-END with inclusive "
                         "layer numbers, e.g. 0-15")
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) is not None else start
    if start < 0 or end < 0:
        raise RangeError(f"layer range {text!r} has a negative layer: layers are numbered from 0")
    if start > end:
        raise RangeError(f"layer range {text!r} starts after it ends: write {end}-{start}")
    return LayerRange(start, end + 1)


def check_cover(ranges: Iterable[LayerRange], n_layer: int) -> list[LayerRange]:
    """Check that ``ranges`` cover layers ``0..n_layer-1`` exactly once; return them sorted.

    Raises RangeError naming the offending range and the fix for: no ranges, a range beyond the
    model, overlaps, gaps, and a cover that does not start at layer 0 or end at layer n_layer-1.
    """
    out = sorted(ranges)
    if not out:
        raise RangeError(f"no layer ranges given: give ranges covering layers 0-{n_layer - 1}")
    for r in out:
        if r.end > n_layer:
            raise RangeError(f"layer range {r.inclusive()} is beyond the model: it has {n_layer} "
                             f"layers, numbered 0..{n_layer - 1}")
    for a, b in pairwise(out):
        if b.start < a.end:
            raise RangeError(f"layer ranges {a.inclusive()} and {b.inclusive()} overlap on "
                             f"{_span(b.start, min(a.end, b.end) - 1)}: give each layer to one range")
        if b.start > a.end:
            raise RangeError(f"{_in_no_range(a.end, b.start - 1)} (between "
                             f"{a.inclusive()} and {b.inclusive()}): extend a neighbouring range")
    if out[0].start != 0:
        raise RangeError(f"{_in_no_range(0, out[0].start - 1)}: the first range must "
                         "start at layer 0")
    if out[-1].end != n_layer:
        raise RangeError(f"{_in_no_range(out[-1].end, n_layer - 1)}: the last range must "
                         f"end at layer {n_layer - 1} (the model has {n_layer} layers)")
    return out


def parse_ranges(text: str, n_layer: int) -> list[LayerRange]:
    """Parse ``"0-6,7-16,17-25,26-29"`` (inclusive, any order) for a model of ``n_layer`` layers.

    Returns the ranges sorted by start. Raises RangeError, naming the bad item and the fix, for
    malformed text, negative layers, start > end, a layer beyond ``n_layer-1``, gaps, overlaps, or
    a cover that does not run from layer 0 to ``n_layer-1``.
    """
    items = text.split(",")
    if not text.strip() or any(not s.strip() for s in items):
        raise RangeError(f"malformed layer ranges {text!r}: write comma-separated inclusive ranges "
                         f"such as 0-{n_layer // 2 - 1},{n_layer // 2}-{n_layer - 1}")
    return check_cover((parse_range(s) for s in items), n_layer)


def plan_parts(layer_bytes: list[int], n_parts: int, first_extra: int = 0,
               last_extra: int = 0) -> list[LayerRange]:
    """Split ``len(layer_bytes)`` layers into ``n_parts`` contiguous non-empty ranges minimising
    the largest stage, in bytes.

    A stage's bytes are the sum of its layers' ``layer_bytes``, plus ``first_extra`` for the stage
    holding layer 0 (token embedding and other input tensors) and ``last_extra`` for the stage
    holding the last layer (output norm and LM head; the caller counts a tied ``token_embd`` in
    both). The result is exactly optimal; among optimal splits it is the one whose sequence of
    range ends is lexicographically smallest (earlier stages as small as the optimum allows), so
    the same input always gives the same plan. Runs in O(n_parts * n_layers^2).

    Raises RangeError if ``n_parts < 1``, ``n_parts > len(layer_bytes)``, or a byte count is
    negative.
    """
    n = len(layer_bytes)
    if n_parts < 1 or n_parts > n:
        raise RangeError(f"cannot split {n} layers into {n_parts} parts: choose between 1 and {n}")
    if min(layer_bytes) < 0 or first_extra < 0 or last_extra < 0:
        raise RangeError("layer and extra byte counts must be >= 0")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def cost(i: int, j: int) -> int:
        return prefix[j] - prefix[i] + (first_extra if i == 0 else 0) + (last_extra if j == n else 0)

    # best[m][i]: smallest possible largest stage when layers i..n-1 form m non-empty stages.
    best: list[list[int | None]] = [[None] * (n + 1) for _ in range(n_parts + 1)]
    for i in range(n):
        best[1][i] = cost(i, n)
    for m in range(2, n_parts + 1):
        for i in range(n - m + 1):
            best[m][i] = min(max(cost(i, j), best[m - 1][j]) for j in range(i + 1, n - m + 2))
    optimum = best[n_parts][0]
    assert optimum is not None

    out, start = [], 0
    for m in range(n_parts, 1, -1):
        end = next(j for j in range(start + 1, n - m + 2)
                   if max(cost(start, j), best[m - 1][j]) <= optimum)
        out.append(LayerRange(start, end))
        start = end
    out.append(LayerRange(start, n))
    return out


def stage_bytes(ranges: list[LayerRange], layer_bytes: list[int], first_extra: int = 0,
                last_extra: int = 0) -> list[int]:
    """Bytes of each stage of ``ranges`` (sorted, covering ``layer_bytes``), counting
    ``first_extra`` on the stage with layer 0 and ``last_extra`` on the one with the last layer."""
    n = len(layer_bytes)
    return [sum(layer_bytes[r.start:r.end]) + (first_extra if r.start == 0 else 0)
            + (last_extra if r.end == n else 0) for r in ranges]
