"""benchmarks/divergent_task.py: the split picked by its rule, and the comparison table, on hand-made runs."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks.divergent_task import compare_table, pick, probe_row


def test_the_most_divergent_split_that_still_trains_is_picked():
    # Prepare: the most divergent split does not train; of the rest, natural diverges most
    probe = pd.DataFrame([
        {"split": "dirichlet-0.1", "routing_tv_round1": 0.07, "routing_tv_mean": 0.07, "accuracy_round5": 0.60},
        {"split": "pathological-1-label", "routing_tv_round1": 0.40, "routing_tv_mean": 0.35, "accuracy_round5": 0.25},
        {"split": "natural-by-corpus", "routing_tv_round1": 0.20, "routing_tv_mean": 0.18, "accuracy_round5": 0.45},
    ])

    unmade = pd.DataFrame([{"split": "dirichlet-0.01", "cannot_be_made": "client 1 has 0 examples"}])

    # Execute / Assert: a split that could not be made is never picked
    assert pick(pd.concat([probe, unmade], ignore_index=True)) == "natural-by-corpus"
    with pytest.raises(SystemExit, match="no split reaches"):
        pick(probe.assign(accuracy_round5=0.3))


def test_a_probe_row_reads_round_one_the_mean_and_the_last_accuracy():
    rounds = pd.DataFrame({"round": [2, 1, 3], "routing_tv": [0.2, 0.1, 0.3], "test_accuracy": [0.3, 0.2, 0.5]})
    assert probe_row("s", rounds) == {"split": "s", "routing_tv_round1": 0.1, "routing_tv_mean": pytest.approx(0.2),
                                      "accuracy_round5": 0.5}


def test_the_comparison_pairs_each_strategy_with_fedavg_by_seed_and_keeps_routing_tv():
    # Prepare: 12 rounds, two seeds; FedProx 0.02 above FedAvg every round, TV 0.3 vs 0.1
    rows = []
    for seed, base in ((0, 0.5), (1, 0.6)):
        for r in range(1, 13):
            rows.append({"alpha": 0.1, "setting": "fedavg", "seed": seed, "round": r, "test_accuracy": base,
                         "routing_tv": 0.1})
            rows.append({"alpha": 0.1, "setting": "fedprox", "seed": seed, "round": r, "test_accuracy": base + 0.02,
                         "routing_tv": 0.3})

    # Execute
    table = compare_table(pd.DataFrame(rows)).set_index("setting")

    # Assert
    assert table.loc["fedprox", "final_vs_fedavg"] == pytest.approx(0.02)
    assert table.loc["fedprox", "early_vs_fedavg"] == pytest.approx(0.02)
    assert table.loc["fedavg", "final_mean"] == pytest.approx(0.55) and table.loc["fedprox", "seeds"] == 2
    assert table.loc["fedprox", "routing_tv"] == pytest.approx(0.3)


def test_compare_before_a_probe_fails_in_one_line_before_ray_starts(tmp_path, monkeypatch):
    # Prepare: starting Ray would fail the test (another test's session may already hold one)
    import sys

    from benchmarks import divergent_task

    def no_ray():
        raise AssertionError("Ray started before the missing probe was noticed")

    monkeypatch.setattr(divergent_task, "embedded_ray", no_ray)
    monkeypatch.setattr(sys, "argv", ["divergent_task.py", "--stage", "compare", "--out", str(tmp_path)])

    # Execute / Assert: a one-line reason as the exit status (non-zero)
    with pytest.raises(SystemExit, match="no split picked yet; run --stage probe first") as exit_info:
        divergent_task.main()
    assert isinstance(exit_info.value.code, str)
