"""The two fixed workloads `nak bench --speculate` measures speculative decoding on.

- ``rewrite``: a given text of about 500 tokens (SmolLM2's tokenizer) and the instruction to
  rewrite it with a few stated changes, so most of the answer, but not all, follows the text:
  where an n-gram drafter (prompt lookup) has the most to offer.
- ``free``: open-ended writing from a short prompt: where it has the least, and speculation must
  stand down rather than cost.

Both are chat turns (the model's chat template applies). Fixed here so that every run and every
figure in docs/performance.md measures the same thing.
"""

from __future__ import annotations

REWRITE_TEXT = """\
The lighthouse on Carrow Point was built in 1871 from granite quarried two miles inland. For
ninety years a keeper lived in the small stone house beside it, climbing the one hundred and
twelve steps to the lamp room three times every night. The first keeper, Thomas Hale, kept a
logbook in which he wrote down the weather, the ships that passed and the birds that struck the
glass during storms. His daughter Margaret took over the light after his death in 1902 and kept
it for thirty-one years, longer than any keeper before or after her.

In the winter of 1924 a fishing boat called the Good Intent lost its rudder in a gale and drifted
towards the rocks below the point. Margaret saw its lantern from the gallery, rowed out with two
men from the village and brought all five fishermen ashore before the boat broke apart. The
village gave her a silver watch, which is now kept in the museum at the harbour, together with
her father's logbooks and a model of the Good Intent carved by one of the men she saved.

The light was converted to electricity in 1958 and made automatic in 1961, when the last keeper
left the point. Today the lamp is checked once a month by an engineer who drives out from the
town, and the keeper's house is rented to visitors in the summer. From the gallery, on a clear
day, you can see the islands twenty miles to the west and the long white line of the beach that
runs north towards the estuary. The path from the car park to the lighthouse takes about
twenty minutes and crosses a field where sheep graze from spring until the first frosts.

Each year on the first Sunday of August the village holds a small festival in Margaret's
memory. Children race rowing boats across the harbour, the museum opens its doors without
charge, and in the evening the lamp room is opened so that visitors can climb the one hundred
and twelve steps and look out over the sea as the keepers once did.
"""

REWRITE_CHANGES = ("the lighthouse is on Bellan Head instead of Carrow Point", "the boat is called the Morning Star "
                   "instead of the Good Intent", "the festival is held on the last Sunday of July")

WORKLOADS: dict[str, str] = {
    "rewrite": ("Rewrite the following text exactly as it is, word for word, with only these changes: "
                + "; ".join(REWRITE_CHANGES) + ". Do not add anything else.\n\n" + REWRITE_TEXT),
    "free": "Write a short story about a robot who learns to paint.",
}


def workload_prompt(name: str) -> str:
    """The user turn of workload ``name`` (``rewrite`` or ``free``). Raises ValueError naming the
    known ones for any other name."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}: use {', '.join(WORKLOADS)}")
    return WORKLOADS[name]
