"""FedAlign-MoE's γ settled by a held-out test: chosen on development seeds, then run once on held-out seeds.

The protocol (written in docs/paper.md, "Settling γ", before any held-out run):

- candidates for γ_ij(e): the spec's 1[σ ≥ τ]·max(D, 0) with D on the LoRA factor
  deltas (``fedalign_moe``) or on the experts' effective weights
  (``fedalign_function``), the σ gate alone (``fedalign_no_d``), and the spec's
  soft gate sigmoid((σ − τ)/T)·max(D, 0), T = 0.05, factor-space D (``fedalign_soft``);
- development: each candidate and FedAvg on seeds 0–2 at α = 0.1 and 1.0, 15
  rounds (``paper_ablation.py``'s runs; final = mean accuracy of the last 5
  rounds, early = rounds 1–10, Δ = candidate − FedAvg of the same seed,
  averaged over seeds);
- choice: among the candidates whose Δ final at α = 1.0 is at least −1 standard
  deviation (over seeds, ddof 1) of FedAvg's final at α = 1.0, the one with the
  greatest Δ final at α = 0.1, ties within 0.005 going to the greater Δ early at
  α = 0.1; if none qualifies, the one with the greatest min(Δ final at 0.1, at 1.0);
- held-out: the chosen candidate and FedAvg once on seeds 3–5, both α, the
  development stage's overrides unchanged; the table is reported as it comes;
- verdict: the chosen candidate becomes the default if its held-out Δ final at
  α = 0.1 is ≥ 0 and its Δ final at α = 1.0 is at least −1 standard deviation of
  FedAvg's held-out final at α = 1.0. Otherwise it still becomes the default (it
  is the least harmful on the development evidence), and the docs say that on
  this task FedAlign-MoE does not beat FedAvg; the demo then stays FedAvg.

The held-out stage refuses to run before the development stage has chosen, or
with other overrides than it chose with.

    .venv/bin/python benchmarks/held_out.py --stage dev model.pretrain.steps=3000
    .venv/bin/python benchmarks/held_out.py --stage held-out model.pretrain.steps=3000
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.paper_ablation's runs

import pandas as pd  # noqa: E402

from benchmarks.paper_ablation import (  # noqa: E402
    embedded_ray,
    paired_with_fedavg,
    per_run_scores,
    run_once,
    stage_arguments,
)

CANDIDATES = ("fedalign_moe", "fedalign_function", "fedalign_no_d", "fedalign_soft")
ALPHAS = (0.1, 1.0)
DEV_SEEDS = (0, 1, 2)
HELD_OUT_SEEDS = (3, 4, 5)
TIE = 0.005  # Δ final at α = 0.1 within this of the best: decided by Δ early
# kept in the repository: the runs (without checkpoints) and the choice are the evidence docs/paper.md reports, and
# its choice.json names the variant divergent_task.py runs
DEFAULT_OUT = "benchmarks/measured/held_out"


def _fedavg_std(per_run: pd.DataFrame, alpha: float) -> float:
    """Standard deviation over seeds (ddof 1) of FedAvg's final accuracy at ``alpha``."""
    return float(per_run[(per_run["setting"] == "fedavg") & (per_run["alpha"] == alpha)]["final"].std(ddof=1))


def _deltas(per_run: pd.DataFrame, settings: list[str]) -> pd.DataFrame:
    """One row per setting: Δ final and Δ early against FedAvg at each α, and the seeds both ran."""
    paired = paired_with_fedavg(per_run).set_index(["setting", "alpha"])
    rows = []
    for setting in settings:
        row: dict[str, object] = {"setting": setting}
        for alpha in ALPHAS:
            p = paired.loc[(setting, alpha)]
            row |= {f"d_final_{alpha}": float(p["final_vs_fedavg"]), f"d_early_{alpha}": float(p["early_vs_fedavg"]),
                    f"seeds_{alpha}": int(p["paired_seeds"])}
        rows.append(row)
    return pd.DataFrame(rows)


def choose(per_run: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The development table (a row per candidate, with ``eligible``) and the candidate the protocol chooses."""
    table = _deltas(per_run, list(CANDIDATES))
    floor = -_fedavg_std(per_run, 1.0)
    table["eligible"] = table["d_final_1.0"] >= floor
    eligible = table[table["eligible"]]
    if len(eligible):
        near = eligible[eligible["d_final_0.1"] >= eligible["d_final_0.1"].max() - TIE]
        chosen = str(near.loc[near["d_early_0.1"].idxmax(), "setting"])
    else:
        worst = table[["d_final_0.1", "d_final_1.0"]].min(axis=1)
        chosen = str(table.loc[worst.idxmax(), "setting"])
    table["chosen"] = table["setting"] == chosen
    return chosen, table


def verdict(per_run: pd.DataFrame, chosen: str) -> tuple[bool, pd.DataFrame]:
    """Whether the held-out runs make ``chosen`` the default on its merits, and the held-out table.

    The table: per α, FedAvg's and the chosen candidate's final and early (mean
    and std over seeds), the paired Δ, and the floor Δ final must clear.
    """
    rows = []
    for alpha in ALPHAS:
        at = per_run[per_run["alpha"] == alpha]
        row: dict[str, object] = {"alpha": alpha}
        for setting in ("fedavg", chosen):
            runs = at[at["setting"] == setting]
            row |= {f"{setting}_final_mean": runs["final"].mean(), f"{setting}_final_std": runs["final"].std(ddof=1),
                    f"{setting}_early_mean": runs["early"].mean()}
        rows.append(row)
    table = pd.DataFrame(rows)
    deltas = _deltas(per_run, [chosen]).iloc[0]
    table["d_final"] = [deltas[f"d_final_{a}"] for a in ALPHAS]
    table["d_early"] = [deltas[f"d_early_{a}"] for a in ALPHAS]
    table["floor"] = [0.0, -_fedavg_std(per_run, 1.0)]
    passes = bool((table["d_final"] >= table["floor"]).all())
    return passes, table


def _run_grid(
    config: str, settings: list[str], seeds: tuple[int, ...], overrides: list[str], runs: Path
) -> pd.DataFrame:
    """Every (α, seed, setting) run (a completed one is read back), as per-run scores."""
    curves = []
    with embedded_ray():
        for alpha in ALPHAS:
            for seed in seeds:
                for setting in settings:
                    rounds = run_once(config, setting, alpha, seed, overrides, runs)
                    curves.append(rounds[["round", "test_accuracy"]].assign(alpha=alpha, seed=seed, setting=setting))
                    print(f"α={alpha} seed={seed} {setting}: final-round accuracy "
                          f"{rounds['test_accuracy'].iloc[-1]:.3f}", flush=True)
    return per_run_scores(pd.concat(curves, ignore_index=True))


def main() -> None:
    args = stage_arguments(__doc__.splitlines()[0], ["dev", "held-out"], DEFAULT_OUT)
    out = Path(args.out)
    choice_file = out / "choice.json"
    pd.set_option("display.width", 200)
    if args.stage == "dev":
        per_run = _run_grid(args.config, ["fedavg", *CANDIDATES], DEV_SEEDS, args.overrides, out / "runs")
        per_run.to_csv(out / "dev_runs.csv", index=False)
        chosen, table = choose(per_run)
        table.to_csv(out / "dev_choice.csv", index=False)
        choice_file.write_text(json.dumps({"chosen": chosen, "overrides": args.overrides, "config": args.config}))
        print(table.to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
        print(f"chosen on development seeds {DEV_SEEDS}: {chosen}")
        return
    if not choice_file.exists():
        raise SystemExit(f"{choice_file}: no development choice yet; run --stage dev first")
    choice = json.loads(choice_file.read_text())
    if choice["overrides"] != args.overrides or choice["config"] != args.config:
        raise SystemExit(f"{choice_file}: the choice was made with config {choice['config']} and overrides "
                         f"{choice['overrides']}; the held-out runs must use the same")
    per_run = _run_grid(args.config, ["fedavg", choice["chosen"]], HELD_OUT_SEEDS, args.overrides, out / "runs")
    per_run.to_csv(out / "held_out_runs.csv", index=False)
    passes, table = verdict(per_run, choice["chosen"])
    table.to_csv(out / "held_out.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{choice['chosen']} on held-out seeds {HELD_OUT_SEEDS}: "
          + ("default on its merits (Δ final ≥ 0 at α = 0.1, within one FedAvg std at α = 1.0)" if passes else
             "does not beat FedAvg on this task; default as the least harmful variant, the demo stays FedAvg"))


if __name__ == "__main__":
    main()
