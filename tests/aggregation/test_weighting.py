"""WeightedMeanAccumulator: Σ w·Δ / Σ w applied to a base, in float64, one update at a time."""

from __future__ import annotations

import numpy as np
import pytest

from aggregation.weighting import WeightedMeanAccumulator, accumulate


def test_apply_adds_the_weighted_mean_to_base_when_weights_differ():
    # Prepare
    acc = WeightedMeanAccumulator(3)
    acc.add(1, np.array([2.0, 0.0, -4.0], dtype=np.float32), 1)
    acc.add(2, np.array([0.0, 2.0, 4.0], dtype=np.float32), 3)
    base = np.array([1.0, 1.0, 1.0], dtype=np.float32)

    # Execute
    out = acc.apply(base)

    # Assert: (1·Δ1 + 3·Δ2) / 4 = [0.5, 1.5, 2.0]
    np.testing.assert_array_equal(out, np.array([1.5, 2.5, 3.0], dtype=np.float32))
    assert out.dtype == np.float32
    assert acc.normalised_weights() == {1: 0.25, 2: 0.75}


def test_apply_returns_a_copy_of_base_when_nothing_was_added():
    # Prepare
    acc = WeightedMeanAccumulator(2)
    base = np.array([3.0, -1.0], dtype=np.float32)

    # Execute
    out = acc.apply(base)

    # Assert
    np.testing.assert_array_equal(out, base)
    assert not np.shares_memory(out, base)
    assert acc.normalised_weights() == {}


def test_add_raises_and_keeps_the_sum_when_a_client_is_added_twice():
    # Prepare
    acc = WeightedMeanAccumulator(2)
    acc.add(5, np.array([2.0, 4.0], dtype=np.float32), 2)

    # Execute / Assert
    with pytest.raises(ValueError, match="client 5: update added twice"):
        acc.add(5, np.array([100.0, 100.0], dtype=np.float32), 2)
    np.testing.assert_array_equal(acc.apply(np.zeros(2, dtype=np.float32)), [2.0, 4.0])
    assert acc.weights == {5: 2.0}


def test_apply_keeps_float64_precision_until_the_final_cast_when_weights_are_large():
    # Prepare: in float32, 2**24 + 1 is lost; the float64 sum keeps it until the mean
    acc = WeightedMeanAccumulator(1)
    acc.add(1, np.array([1.0], dtype=np.float32), 2**24)
    acc.add(2, np.array([0.0], dtype=np.float32), 2**24)

    # Execute
    out = acc.apply(np.zeros(1, dtype=np.float32))

    # Assert
    np.testing.assert_array_equal(out, [0.5])


def test_accumulate_scalar_weight_adds_in_float64_from_float32():
    # Prepare
    acc = np.array([1.0, 2.0])
    values = np.array([0.5, 0.25], dtype=np.float32)
    values.flags.writeable = False  # as object-store views are

    # Execute
    accumulate(acc, values, 4)

    # Assert
    np.testing.assert_array_equal(acc, [3.0, 3.0])


def test_accumulate_row_weights_weigh_each_row():
    # Prepare: 2 rows of 3 values, flat
    acc = np.zeros(6)
    values = np.arange(6, dtype=np.float32)

    # Execute
    accumulate(acc, values, np.array([2.0, -1.0]))

    # Assert
    np.testing.assert_array_equal(acc, [0, 2, 4, -3, -4, -5])
