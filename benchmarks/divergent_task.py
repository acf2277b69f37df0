"""A demo-task split where clients' routing really diverges, and FedAvg, FedProx and FedAlign-MoE on it.

At Dirichlet α = 0.1 the demo's clients route almost alike (mean pairwise total
variation of their routing distributions 0.074): the "one-size-fits-none"
router FedAlign-MoE exists to fix is barely there. Two stages, the rule fixed
before either ran:

- ``--stage probe``: each candidate split (``SPLITS``) trains 5 FedAvg rounds
  (seed 0); the table gives the clients' routing TV (round 1, and the mean over
  the 5 rounds) and the test accuracy at round 5. The split picked is the one
  with the greatest mean TV among those whose round-5 accuracy is at least
  ``TRAINS`` (twice chance over the 5 topics): divergent, but still learning.
- ``--stage compare``: on the picked split, FedAvg, FedProx and FedAlign-MoE
  (the γ variant ``held_out.py`` chose on development seeds, else the spec's)
  on development seeds 0–2, 15 rounds; final, early and Δ against FedAvg as in
  ``paper_ablation.py``, with each run's mean routing TV beside them.

    .venv/bin/python benchmarks/divergent_task.py --stage probe model.pretrain.steps=3000
    .venv/bin/python benchmarks/divergent_task.py --stage compare model.pretrain.steps=3000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.paper_ablation's runs

import pandas as pd  # noqa: E402

from aggregation.errors import DataError  # noqa: E402
from benchmarks.held_out import DEFAULT_OUT as HELD_OUT  # noqa: E402
from benchmarks.paper_ablation import (  # noqa: E402
    embedded_ray,
    paired_with_fedavg,
    per_run_scores,
    run_once,
    stage_arguments,
)

# split → (Dirichlet α for run_once's key and data.alpha, further overrides)
SPLITS: dict[str, tuple[float, list[str]]] = {
    "dirichlet-0.1": (0.1, []),
    "dirichlet-0.01": (0.01, []),
    "dirichlet-0.05-30-clients": (0.05, ["data.num_clients=30", "clients_per_round=10"]),
    "pathological-1-label": (0.1, ["data.partition=pathological", "data.labels_per_client=1"]),
    "natural-by-corpus": (0.1, ["data.partition=natural", "data.num_clients=5", "clients_per_round=5"]),
}
PROBE_ROUNDS = 5
TRAINS = 0.4  # round-5 test accuracy a split must reach to count as still training (chance: 0.2)
SEEDS = (0, 1, 2)


def pick(probe: pd.DataFrame) -> str:
    """The split with the greatest mean routing TV among those that still train (``TRAINS``)."""
    training = probe[probe["accuracy_round5"] >= TRAINS]  # a split that cannot be made has NaN: left out
    if training.empty:
        raise SystemExit(f"no split reaches {TRAINS} test accuracy in {PROBE_ROUNDS} FedAvg rounds")
    return str(training.loc[training["routing_tv_mean"].idxmax(), "split"])


def probe_row(split: str, rounds: pd.DataFrame) -> dict[str, object]:
    """A probe run's routing divergence and whether it trains."""
    last = rounds.sort_values("round").iloc[-1]
    return {"split": split, "routing_tv_round1": float(rounds.loc[rounds["round"] == 1, "routing_tv"].iloc[0]),
            "routing_tv_mean": float(rounds["routing_tv"].mean()), "accuracy_round5": float(last["test_accuracy"])}


def compare_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Per strategy: final and early (mean ± std over seeds), Δ against FedAvg by seed, mean routing TV."""
    per_run = per_run_scores(curves[["alpha", "setting", "seed", "round", "test_accuracy"]])
    tv = curves.groupby(["setting", "seed"])["routing_tv"].mean().rename("routing_tv").reset_index()
    per_run = per_run.merge(tv, on=["setting", "seed"])
    table = per_run.groupby("setting").agg(
        seeds=("seed", "nunique"), final_mean=("final", "mean"), final_std=("final", "std"),
        early_mean=("early", "mean"), routing_tv=("routing_tv", "mean"),
    ).reset_index()
    paired = paired_with_fedavg(per_run)[["setting", "final_vs_fedavg", "early_vs_fedavg"]]
    return table.merge(paired, on="setting", how="left")


def probe(args: argparse.Namespace, out: Path) -> None:
    """Every candidate split's divergence and accuracy, and the split the rule picks (``picked.json``)."""
    rows = []
    with embedded_ray():
        for split, (alpha, extra) in SPLITS.items():
            try:
                overrides = [*extra, f"rounds={PROBE_ROUNDS}", *args.overrides]
                rounds = run_once(args.config, "fedavg", alpha, 0, overrides, out / "runs" / f"probe-{split}")
            except DataError as exc:  # e.g. a Dirichlet draw that leaves a client without examples
                rows.append({"split": split, "cannot_be_made": str(exc)})
                continue
            rows.append(probe_row(split, rounds))
    table = pd.DataFrame(rows)
    picked = pick(table)
    table.to_csv(out / "probe.csv", index=False)
    (out / "picked.json").write_text(json.dumps({"split": picked, "overrides": args.overrides}))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"picked: {picked} (greatest mean routing TV among splits at ≥ {TRAINS} accuracy by round {PROBE_ROUNDS})")


def compare(args: argparse.Namespace, out: Path) -> None:
    """FedAvg, FedProx and FedAlign-MoE on the picked split over ``SEEDS``: ``compare_<split>.csv``.

    The picked split and the γ variant are read before Ray starts, so a missing probe fails at once.
    """
    picked_file = out / "picked.json"
    if not picked_file.exists():
        raise SystemExit(f"{picked_file}: no split picked yet; run --stage probe first")
    split = json.loads(picked_file.read_text())["split"]
    choice = Path(HELD_OUT) / "choice.json"
    fedalign = json.loads(choice.read_text())["chosen"] if choice.exists() else "fedalign_moe"
    alpha, extra = SPLITS[split]
    curves = []
    with embedded_ray():
        for seed in SEEDS:
            for setting in ("fedavg", "fedprox", fedalign):
                rounds = run_once(args.config, setting, alpha, seed, [*extra, *args.overrides], out / "runs" / split)
                curves.append(rounds[["round", "test_accuracy", "routing_tv"]].assign(alpha=alpha, seed=seed,
                                                                                      setting=setting))
                print(f"{split} seed={seed} {setting}: final-round accuracy {rounds['test_accuracy'].iloc[-1]:.3f}",
                      flush=True)
    table = compare_table(pd.concat(curves, ignore_index=True))
    table.to_csv(out / f"compare_{split}.csv", index=False)
    print(f"split: {split}; FedAlign-MoE variant: {fedalign}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def main() -> None:
    args = stage_arguments(__doc__.splitlines()[0], ["probe", "compare"], "benchmarks/measured/divergent_task")
    (probe if args.stage == "probe" else compare)(args, Path(args.out))


if __name__ == "__main__":
    main()
