"""Uplink codecs: hand-computed slices, byte counts, and error feedback's bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation.compression import CODECS, encode

SPANS = {"a": (0, 3), "b": (3, 7)}
X = np.array([0.0, 0.5, -1.0, 1.0, -3.0, 2.0, 0.5], dtype=np.float32)


def test_int8_has_one_scale_per_slice_and_counts_a_byte_a_value_plus_the_scale():
    # Execute
    enc, residual = encode(X, SPANS, "int8")

    # Assert: slice a: scale 1/127, 0.5 → rint(63.5) = 64; slice b: scale 3/127, exact at ±3 and the peak
    np.testing.assert_allclose(enc.values[:3], [0.0, 64 / 127, -1.0], rtol=1e-6)
    np.testing.assert_allclose(enc.values[4], -3.0, rtol=1e-6)
    assert enc.nbytes == {"a": 3 + 4, "b": 4 + 4} and residual is None


def test_topk_keeps_the_largest_magnitudes_of_each_slice_as_value_index_pairs():
    # Execute
    enc, _ = encode(X, SPANS, "topk", fraction=0.5)

    # Assert: a keeps ⌈1.5⌉ = 2 of 3 (−1, 0.5); b keeps 2 of 4 (−3, 2)
    np.testing.assert_array_equal(enc.values, [0.0, 0.5, -1.0, 0.0, -3.0, 2.0, 0.0])
    assert enc.nbytes == {"a": 16, "b": 16}
    assert enc.relative_error == pytest.approx(np.sqrt(1 + 0.25) / np.linalg.norm(X))


@pytest.mark.parametrize("codec", ["fp16", "bf16"])
def test_sixteen_bit_floats_take_two_bytes_a_value(codec):
    enc, _ = encode(X, SPANS, codec)
    assert enc.nbytes == {"a": 6, "b": 8} and enc.relative_error < 1e-2
    np.testing.assert_allclose(enc.values, X, rtol=1e-2)


def test_none_is_exact_at_four_bytes_a_value():
    enc, _ = encode(X, SPANS, "none")
    np.testing.assert_array_equal(enc.values, X)
    assert enc.nbytes == {"a": 12, "b": 16} and enc.relative_error == 0.0


def test_slices_must_cover_the_update():
    with pytest.raises(ValueError, match="cover 3 of 7"):
        encode(X, {"a": (0, 3)}, "int8")


@settings(max_examples=30, deadline=None)
@given(codec=st.sampled_from([c for c in CODECS if c != "none"]), seed=st.integers(0, 1000), rounds=st.integers(1, 5))
def test_error_feedback_delivers_everything_eventually(codec, seed, rounds):
    # Prepare
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=7).astype(np.float32) for _ in range(rounds)]
    residual = np.zeros(7, dtype=np.float32)

    # Execute
    delivered = np.zeros(7)
    for x in xs:
        enc, residual = encode(x, SPANS, codec, fraction=0.3, residual=residual)
        delivered += enc.values

    # Assert: what arrived plus what is still carried is what was sent
    np.testing.assert_allclose(delivered + residual, np.sum(xs, axis=0), atol=1e-5)
