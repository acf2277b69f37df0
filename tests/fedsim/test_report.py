"""fedsim report's FedAlign-MoE figure, drawn from a hand-made rounds table."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fedsim.report import strategy_figure

ROUNDS = pd.DataFrame({
    "round": [1, 2, 3], "n_aggregated": [4.0, 4.0, 2.0],
    "omega_entropy": [1.30, 1.20, 0.60], "p_g_shift_tv": [0.10, 0.05, 0.02],
    "excluded_pair_frac": [0.2, 0.1, 0.0], "experts_kept_frac": [0.0, 0.25, 0.5],
    "consensus_mean": [0.04, -0.10, 0.30], "consensus_negative_frac": [0.35, 0.6, 0.1],
})


def _lines(ax: plt.Axes) -> dict[str, list[float]]:
    return {line.get_label(): [float(v) for v in line.get_ydata()] for line in ax.get_lines()}


def test_the_figure_draws_each_modules_diagnostics_per_round_in_its_own_panel():
    # Execute
    fig = strategy_figure(ROUNDS)

    # Assert: Module 1 left with log N beside ω's entropy; Module 2 right, D's mean and share < 0 among them
    assert fig is not None
    left, right = fig.axes
    routing, experts = _lines(left), _lines(right)
    assert routing["ω entropy (nats)"] == [1.30, 1.20, 0.60]
    assert routing["p_g shift (total variation)"] == [0.10, 0.05, 0.02]
    np.testing.assert_allclose(routing["log N (uniform ω)"], [math.log(4), math.log(4), math.log(2)])
    assert experts["pairs excluded by the σ gate"] == [0.2, 0.1, 0.0]
    assert experts["experts kept"] == [0.0, 0.25, 0.5]
    assert experts["D mean"] == [0.04, -0.10, 0.30]
    assert experts["share of pairs with D < 0"] == [0.35, 0.6, 0.1]
    plt.close(fig)


def test_a_run_without_the_diagnostics_has_no_figure_and_a_partial_one_draws_what_it_has():
    # Execute
    none = strategy_figure(ROUNDS[["round", "n_aggregated"]])
    no_d = strategy_figure(ROUNDS.drop(columns=["consensus_mean", "consensus_negative_frac"]))  # ablation: no D

    # Assert
    assert none is None
    assert no_d is not None and "D mean" not in _lines(no_d.axes[1]) and "experts kept" in _lines(no_d.axes[1])
    assert no_d.axes[1].get_title() == "Module 2: expert gating"
    plt.close(no_d)
