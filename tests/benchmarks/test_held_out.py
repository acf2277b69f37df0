"""benchmarks/held_out.py: the protocol's choice and verdict on hand-made per-run results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import held_out
from benchmarks.held_out import CANDIDATES, choose, verdict

SEEDS = (0, 1, 2)
FEDAVG = {0.1: [0.60, 0.62, 0.64], 1.0: [0.70, 0.72, 0.74]}  # std of the α = 1.0 finals: 0.02


def _per_run(shifts: dict[str, dict[float, tuple[float, float]]]) -> pd.DataFrame:
    """Per-run scores: FedAvg's as above; each setting's final and early = FedAvg's + (Δ final, Δ early), per seed."""
    rows = []
    for alpha, finals in FEDAVG.items():
        for seed, final in zip(SEEDS, finals, strict=True):
            rows.append({"alpha": alpha, "setting": "fedavg", "seed": seed, "final": final, "early": final - 0.05})
            for setting, by_alpha in shifts.items():
                d_final, d_early = by_alpha[alpha]
                rows.append({"alpha": alpha, "setting": setting, "seed": seed, "final": final + d_final,
                             "early": final - 0.05 + d_early})
    return pd.DataFrame(rows)


def test_the_best_at_alpha_0_1_is_passed_over_when_it_loses_more_than_a_std_at_alpha_1():
    # Prepare: function space best at α = 0.1 (+0.04) but 0.03 below FedAvg at α = 1.0 (std 0.02)
    per_run = _per_run({"fedalign_moe": {0.1: (-0.06, -0.09), 1.0: (-0.01, 0.0)},
                        "fedalign_function": {0.1: (0.04, 0.02), 1.0: (-0.03, 0.0)},
                        "fedalign_no_d": {0.1: (0.01, 0.0), 1.0: (-0.015, 0.0)},
                        "fedalign_soft": {0.1: (-0.02, 0.0), 1.0: (0.0, 0.0)}})

    # Execute
    chosen, table = choose(per_run)

    # Assert
    assert chosen == "fedalign_no_d"
    assert list(table["setting"]) == list(CANDIDATES)
    assert list(table["eligible"]) == [True, False, True, True]
    assert table.set_index("setting").loc["fedalign_function", "d_final_0.1"] == pytest.approx(0.04)
    assert table["chosen"].sum() == 1


def test_a_tie_within_half_a_point_goes_to_the_better_early_rounds():
    # Prepare: two eligible candidates 0.003 apart at α = 0.1; the lower one leads over rounds 1-10
    per_run = _per_run({"fedalign_moe": {0.1: (0.010, 0.00), 1.0: (0.0, 0.0)},
                        "fedalign_function": {0.1: (0.007, 0.02), 1.0: (0.0, 0.0)},
                        "fedalign_no_d": {0.1: (-0.01, 0.05), 1.0: (0.0, 0.0)},
                        "fedalign_soft": {0.1: (-0.02, 0.0), 1.0: (0.0, 0.0)}})

    # Execute / Assert: no_d's better early rounds do not count, it is not within the tie
    assert choose(per_run)[0] == "fedalign_function"


def test_with_no_candidate_eligible_the_least_harmful_one_is_chosen():
    # Prepare: all lose more than a std at α = 1.0; soft loses least in its worse α
    per_run = _per_run({"fedalign_moe": {0.1: (-0.06, 0.0), 1.0: (-0.03, 0.0)},
                        "fedalign_function": {0.1: (0.02, 0.0), 1.0: (-0.08, 0.0)},
                        "fedalign_no_d": {0.1: (-0.05, 0.0), 1.0: (-0.04, 0.0)},
                        "fedalign_soft": {0.1: (-0.035, 0.0), 1.0: (-0.035, 0.0)}})

    # Execute / Assert
    chosen, table = choose(per_run)
    assert chosen == "fedalign_soft" and not table["eligible"].any()


@pytest.mark.parametrize(("d_01", "d_10", "passes"), [
    (0.0, -0.019, True),  # level at α = 0.1, within one FedAvg std at α = 1.0
    (-0.001, 0.01, False),  # below FedAvg at α = 0.1
    (0.05, -0.021, False),  # more than a std below at α = 1.0
])
def test_the_verdict_needs_no_loss_at_alpha_0_1_and_at_most_a_std_at_alpha_1(d_01: float, d_10: float, passes: bool):
    # Prepare
    per_run = _per_run({"fedalign_no_d": {0.1: (d_01, 0.01), 1.0: (d_10, 0.0)}})

    # Execute
    ok, table = verdict(per_run, "fedalign_no_d")

    # Assert: the table reports both α with its paired Δ and the floor it had to clear
    assert ok is passes
    assert list(table["alpha"]) == [0.1, 1.0]
    assert table["d_final"].tolist() == pytest.approx([d_01, d_10])
    assert table["floor"].tolist() == pytest.approx([0.0, -0.02])
    assert table["fedavg_final_mean"].tolist() == pytest.approx([0.62, 0.72])


def test_the_held_out_stage_refuses_without_a_choice_or_with_other_overrides(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch):
    # Prepare
    argv = ["held_out.py", "--stage", "held-out", "--out", str(tmp_path), "model.pretrain.steps=3000"]
    monkeypatch.setattr(sys, "argv", argv)

    # Execute / Assert: no development choice yet
    with pytest.raises(SystemExit, match="no development choice yet"):
        held_out.main()

    # Execute / Assert: a choice made with other overrides
    (tmp_path / "choice.json").write_text(json.dumps(
        {"chosen": "fedalign_no_d", "overrides": ["model.pretrain.steps=300"], "config": "configs/demo.yaml"}))
    with pytest.raises(SystemExit, match="must use the same"):
        held_out.main()
