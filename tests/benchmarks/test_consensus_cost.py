"""benchmarks/consensus_cost.py: D's cost in both spaces, on the tiny layout."""

from __future__ import annotations

from benchmarks.consensus_cost import cost_table


def test_cost_table_times_both_spaces_and_scales_a_slice_to_the_round():
    # Execute
    table = cost_table("tiny", [4, 8], repeats=1)

    # Assert: one row per cohort size; a round is one expert's seconds × the experts; function space allocates more
    assert list(table["clients"]) == [4, 8] and (table["adapted_matrices"] == 2).all()
    assert (table["factors_ms"] > 0).all() and (table["function_ms"] > 0).all()
    assert (table["function_round_s"] - table["function_ms"] * table["experts"] / 1e3).abs().max() < 1e-9
    assert (table["function_extra_mib"] > table["factors_extra_mib"]).all()
