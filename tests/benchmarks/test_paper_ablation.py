"""The ablation table's summary columns on hand-made accuracy curves, and what the grid does with existing runs.

Which runs the grid reuses (completed), continues (interrupted, with a checkpoint) or refuses (without one).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from benchmarks import paper_ablation
from benchmarks.paper_ablation import summarise


def _curve(setting: str, seed: int, accuracies: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"round": range(1, len(accuracies) + 1), "test_accuracy": accuracies,
                         "alpha": 0.1, "seed": seed, "setting": setting})


def test_final_early_and_rounds_to_ninety_percent_of_the_best_final():
    # Prepare: 12 rounds; fedalign's two seeds end at 0.8, fedavg ends at 0.5 and never reaches 0.72
    fast = [0.5, 0.75] + [0.8] * 10
    slow = [0.3] * 6 + [0.74] * 6
    curves = pd.concat([
        _curve("fedalign_moe", 0, fast), _curve("fedalign_moe", 1, slow), _curve("fedavg", 0, [0.5] * 12),
    ])

    # Execute
    table = summarise(curves).set_index("setting")

    # Assert: best final mean = (0.8 + 0.74)/2 = 0.77 → target 0.693
    assert table.loc["fedalign_moe", "target_90"] == pytest.approx(0.693)
    assert table.loc["fedalign_moe", "final_mean"] == pytest.approx(0.77)
    assert table.loc["fedalign_moe", "final_std"] == pytest.approx(np.std([0.8, 0.74], ddof=1))
    assert table.loc["fedalign_moe", "early_mean"] == pytest.approx((np.mean(fast[:10]) + np.mean(slow[:10])) / 2)
    assert table.loc["fedalign_moe", "rounds_to_90_mean"] == pytest.approx((2 + 7) / 2)
    assert np.isnan(table.loc["fedavg", "rounds_to_90_mean"]) and table.loc["fedavg", "reached"] == 0
    assert list(table.index) == ["fedavg", "fedalign_moe"]  # the ladder's order


def test_differences_to_fedavg_are_paired_by_seed():
    # Prepare: seed 0 is an easy split (everything high), seed 1 a hard one; fedprox beats fedavg by 0.02 on both;
    # fedalign ran seed 1 only
    curves = pd.concat([
        _curve("fedavg", 0, [0.80] * 12), _curve("fedavg", 1, [0.60] * 12),
        _curve("fedprox", 0, [0.82] * 12), _curve("fedprox", 1, [0.62] * 12),
        _curve("fedalign_moe", 1, [0.55] * 12),
    ])

    # Execute
    table = summarise(curves).set_index("setting")

    # Assert: the paired difference ignores the split's difficulty; an unpaired mean would say 0.55 − 0.70
    assert table.loc["fedprox", "final_vs_fedavg"] == pytest.approx(0.02)
    assert table.loc["fedprox", "early_vs_fedavg"] == pytest.approx(0.02)
    assert table.loc["fedalign_moe", "final_vs_fedavg"] == pytest.approx(-0.05)
    assert table.loc["fedalign_moe", "paired_seeds"] == 1 and table.loc["fedavg", "final_vs_fedavg"] == 0.0


class TestRunOnce:
    """``run_once`` on the directory a (setting, α, seed, configuration) maps to; no run is started."""

    @pytest.fixture
    def calls(self, monkeypatch) -> list[str]:
        calls: list[str] = []
        rounds = pd.DataFrame({"round": [1], "test_accuracy": [0.5]})
        monkeypatch.setattr(paper_ablation, "run",
                            lambda cfg, out: calls.append(f"run {out.name}") or SimpleNamespace(rounds=rounds))
        monkeypatch.setattr(paper_ablation, "resume",
                            lambda out: calls.append(f"resume {out.name}") or SimpleNamespace(rounds=rounds))
        return calls

    def _dir(self, runs: Path, calls: list[str]) -> Path:
        paper_ablation.run_once(None, "fedavg", 0.1, 0, [], runs)  # a fresh directory: a new run
        (name,) = [c.split()[1] for c in calls]
        calls.clear()
        return runs / name

    def test_a_completed_run_is_read_back(self, tmp_path, calls):
        run_dir = self._dir(tmp_path, calls)
        run_dir.mkdir()
        (run_dir / "status.json").write_text(json.dumps({"status": "completed"}))
        pd.DataFrame({"round": [1, 2], "test_accuracy": [0.4, 0.6]}).to_parquet(run_dir / "rounds.parquet")

        rounds = paper_ablation.run_once(None, "fedavg", 0.1, 0, [], tmp_path)

        assert calls == [] and rounds["test_accuracy"].tolist() == [0.4, 0.6]

    def test_an_interrupted_run_with_a_checkpoint_is_resumed(self, tmp_path, calls):
        run_dir = self._dir(tmp_path, calls)
        run_dir.mkdir()
        (run_dir / "status.json").write_text(json.dumps({"status": "running"}))
        (run_dir / paper_ablation.CHECKPOINT).write_bytes(b"")

        paper_ablation.run_once(None, "fedavg", 0.1, 0, [], tmp_path)

        assert calls == [f"resume {run_dir.name}"]

    def test_an_interrupted_run_without_a_checkpoint_is_refused_naming_it(self, tmp_path, calls):
        run_dir = self._dir(tmp_path, calls)
        run_dir.mkdir()

        with pytest.raises(SystemExit, match=run_dir.name):
            paper_ablation.run_once(None, "fedavg", 0.1, 0, [], tmp_path)
        assert calls == []

    def test_a_setting_keeps_its_gamma_and_its_run_when_the_defaults_move(self, tmp_path, monkeypatch):
        # Prepare: a configuration whose strategy, routing statistics and γ differ from those the grids ran with,
        # as after the held-out test moved γ's default and the demo to FedAlign-MoE
        moved = tmp_path / "moved.yaml"
        moved.write_text("strategy:\n  name: fedalign_moe\n  fedalign:\n    direction_consensus: false\n"
                         "    gate: soft\ntrain:\n  routing_stats: after\n")
        seen = []
        monkeypatch.setattr(paper_ablation, "run",
                            lambda cfg, out: seen.append((cfg, out.name)) or SimpleNamespace(rounds=pd.DataFrame()))

        # Execute
        for setting in ("fedalign_moe", "fedalign_no_d", "fedavg"):
            for config in (None, moved):
                paper_ablation.run_once(config, setting, 0.1, 0, [], tmp_path)

        # Assert: each setting names the same configuration, so the same recorded run, whatever the defaults
        (spec, spec_dir), (after, after_dir), (no_d, no_d_dir), (no_d_after, no_d_after_dir), *fedavg = seen
        assert spec_dir == after_dir and no_d_dir == no_d_after_dir and fedavg[0][1] == fedavg[1][1]
        assert (after.strategy.fedalign.direction_consensus, after.strategy.fedalign.consensus_space,
                after.strategy.fedalign.gate) == (True, "factors", "hard")
        assert not no_d_after.strategy.fedalign.direction_consensus and no_d_after.strategy.fedalign.gate == "hard"
        assert fedavg[1][0].strategy.name == "fedavg" and fedavg[1][0].train.routing_stats == "during"
