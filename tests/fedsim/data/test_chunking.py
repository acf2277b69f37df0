"""Normalisation, chunk tiling and the round-robin cap behind the corpus."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.data.chunking import normalize_words, passes_needed, round_robin_select, tile_spans


def test_normalize_words_folds_case_accents_and_repeated_marks():
    assert normalize_words("It's 4:00pm -- Café time!!  [x]") == [
        "it's", "4", ":", "00pm", "-", "cafe", "time", "!", "x",
    ]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 400), low=st.integers(1, 30), extra=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_tile_spans_first_pass_is_contiguous_with_lengths_in_bounds(n, low, extra, seed):
    # Execute
    spans = tile_spans(n, np.random.default_rng(seed), min_words=low, max_words=low + extra)

    # Assert: starts at 0, each chunk starts where the last ended, all inside the document
    starts = [s for s, _ in spans]
    stops = [e for _, e in spans]
    assert starts == ([0] + stops[:-1] if spans else [])
    assert all(low <= e - s <= low + extra for s, e in spans)
    assert not spans or stops[-1] <= n
    assert n - (stops[-1] if spans else 0) < low + extra  # the tail left is shorter than one draw


@settings(max_examples=40, deadline=None)
@given(n=st.integers(50, 400), passes=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_tile_spans_extra_passes_give_distinct_spans_inside_the_document(n, passes, seed):
    spans = tile_spans(n, np.random.default_rng(seed), min_words=10, max_words=20, passes=passes)
    assert len(set(spans)) == len(spans)
    assert all(0 <= s and e <= n and 10 <= e - s <= 20 for s, e in spans)


def test_passes_needed_rounds_up_and_respects_the_cap():
    assert passes_needed(100, 250, 5) == 3
    assert passes_needed(100, 90, 5) == 1
    assert passes_needed(10, 1000, 3) == 3
    assert passes_needed(0, 10, 3) == 1


def test_round_robin_select_spreads_the_cap_over_documents():
    # Prepare: one long document, three short ones
    items = [range(100), range(2), range(3), range(1)]

    # Execute
    kept = round_robin_select(items, cap=10, rng=np.random.default_rng(0))

    # Assert: short documents are used up before the long one fills the rest
    assert [len(k) for k in kept] == [4, 2, 3, 1]
    assert all(k == sorted(k) and set(k) <= set(r) for k, r in zip(kept, items, strict=True))


def test_round_robin_select_keeps_everything_when_under_the_cap():
    kept = round_robin_select([range(3), range(2)], cap=100, rng=np.random.default_rng(1))
    assert kept == [[0, 1, 2], [0, 1]]
