"""What FedAlign-MoE's alignment signals measure on real client updates of the demo task.

The paper ablation found Module 2 costing accuracy at this scale. This script
looks at the signals Module 2 gates on, computed on one round of real client
updates (every client trained from the same global payload), at each
Dirichlet α:

- σ (eq. 7) between the same expert on two clients, against σ between expert e
  on one client and expert e+1 on another: a pair known to play different roles,
  so the gap between the two says how much σ can tell aligned from misaligned;
- the share of counted pairs the threshold τ = M − β·Σ (eq. 9) excludes;
- D (eq. 8), the cosine of two clients' updates of one expert, and how often it
  is negative (γ = 0 whatever σ says), both ways: on the LoRA factor deltas
  (``factors``) and on the change of the expert's effective weights
  (``function``, ``aggregation.function_space``); and D between expert e on one
  client and expert e+1 on another, so the gap says whether D tells the same
  expert from a different one;
- the entropy of Module 1's consistency weights ω (eq. 3) beside that of the
  n-weights FedAvg uses: log N when every client weighs the same.

    .venv/bin/python benchmarks/alignment_signals.py model.pretrain.steps=3000
    .venv/bin/python benchmarks/alignment_signals.py --checkpoint RUN_DIR   # from that run's last global payload
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsim import environment  # noqa: E402

environment.apply()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from aggregation import function_space as fs  # noqa: E402
from aggregation import routing_alignment as ra  # noqa: E402
from aggregation import semantic_alignment as sa  # noqa: E402
from aggregation.messages import ClientInstructions, ClientUpdate  # noqa: E402
from aggregation.payload import PayloadLayout  # noqa: E402
from fedsim.checkpoint import load_checkpoint  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.driver import engine_spec  # noqa: E402
from fedsim.prepare import prepare  # noqa: E402
from fedsim.quiet import quiet_libraries  # noqa: E402
from fedsim.seeds import client_seed  # noqa: E402


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def consensus_pairs(
    deltas: np.ndarray, other: np.ndarray, base: np.ndarray, base_other: np.ndarray, factors: fs.ExpertFactors
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """D between the clients' updates of one expert (same) and of it against the next expert (across), pairs i < j.

    ``deltas`` and ``other`` are [N, |θ(e)|] slices of experts e and e+1 (the same
    layout), ``base`` and ``base_other`` their starting values. Returns, per space,
    (same [pairs], across [pairs]): the Gram of all 2N rows, each row from its own
    expert's start, read in two blocks.
    """
    n = len(deltas)
    upper = np.triu_indices(n, k=1)
    rows = np.concatenate([deltas, other])
    starts = np.concatenate([np.broadcast_to(base, deltas.shape), np.broadcast_to(base_other, other.shape)])
    out = {}
    for space, gram in (("factors", sa.slice_gram(rows)), ("function", fs.function_gram(rows, starts, factors))):
        d = sa.direction_consensus(gram)
        out[space] = (d[:n, :n][upper], d[:n, n:][upper])
    return out


def alignment_signals(
    updates: list[ClientUpdate], layout: PayloadLayout, payload: np.ndarray, *, beta: float = 1.0
) -> dict[str, float]:
    """One row of signal statistics over every (layer, expert) slice of one round's updates.

    Pairs are i < j. σ counts only pairs where both clients routed tokens to
    the expert(s) compared; D counts every pair. ``payload`` is the global
    payload the updates started from (function-space D reads the factors' start).
    """
    n = np.array([u.n_examples for u in updates], dtype=np.float64)
    upper = np.triu_indices(len(updates), k=1)
    same, across = [], []
    consensus: dict[str, list[np.ndarray]] = {f"{space}_{which}": [] for space in ("factors", "function")
                                              for which in ("same", "across")}
    excluded = counted_pairs = 0
    for layer, expert in layout.expert_keys():
        stats = [u.routing[layer] for u in updates]
        num_experts = stats[0].num_experts
        mu, counts = np.stack([st.mu[expert] for st in stats]), np.array([st.counts[expert] for st in stats])
        sigma, counted = sa.signature_similarity(mu, counts)
        same.append(sigma[upper][counted[upper]])
        out, pairs = sa.excluded_pairs(sigma, counted, sa.threshold(sigma, counted, beta=beta))
        excluded, counted_pairs = excluded + out, counted_pairs + pairs
        other = (expert + 1) % num_experts
        mu_other, counts_other = np.stack([st.mu[other] for st in stats]), np.array([st.counts[other] for st in stats])
        cross = _unit_rows(mu) @ _unit_rows(mu_other).T  # σ(expert e on i, expert e+1 on j)
        both = (counts[:, None] > 0) & (counts_other[None, :] > 0)
        across.append(cross[upper][both[upper]])
        a, b = layout.expert_span(layer, expert)
        lo, hi = layout.expert_span(layer, other)
        pairs = consensus_pairs(np.stack([u.delta[a:b] for u in updates]), np.stack([u.delta[lo:hi] for u in updates]),
                                payload[a:b], payload[lo:hi],
                                fs.expert_factors(layout.select(role="expert", layer=layer, expert=expert)))
        for space, (d_same, d_across) in pairs.items():
            consensus[f"{space}_same"].append(d_same)
            consensus[f"{space}_across"].append(d_across)
    omega_entropy = []
    for layer in range(layout.num_layers):
        stats = [u.routing[layer] for u in updates]
        p_bar = np.stack([st.p_bar for st in stats])
        o = ra.overlap(p_bar, ra.uniform_routing(1, p_bar.shape[1])[0])
        s = ra.consistency_scores(o, np.stack([st.margin for st in stats]))
        omega_entropy.append(ra.weight_entropy(ra.consistency_weights(s, n)))
    sigma_same, sigma_across = np.concatenate(same), np.concatenate(across)
    d = {key: np.concatenate(values) for key, values in consensus.items()}
    share = n / n.sum()
    return {
        "clients": float(len(updates)),
        "sigma_same_mean": float(sigma_same.mean()),
        "sigma_same_p5": float(np.percentile(sigma_same, 5)),
        "sigma_across_mean": float(sigma_across.mean()),
        "sigma_across_p95": float(np.percentile(sigma_across, 95)),
        "excluded_pair_frac": excluded / counted_pairs if counted_pairs else 0.0,
        **{f"D_{space}_{stat}": value for space in ("factors", "function") for stat, value in (
            ("mean", float(d[f"{space}_same"].mean())),
            ("negative_frac", float((d[f"{space}_same"] < 0).mean())),
            ("across_mean", float(d[f"{space}_across"].mean())),
            ("separation", float(d[f"{space}_same"].mean() - d[f"{space}_across"].mean())),
        )},
        "omega_entropy": float(np.mean(omega_entropy)),
        "n_weight_entropy": float(-(share * np.log(share)).sum()),
        "log_N": float(np.log(len(updates))),
    }


def round_updates(
    config: str, alpha: float, overrides: list[str], checkpoint: str | None
) -> tuple[list[ClientUpdate], PayloadLayout, np.ndarray]:
    """Every client of the run trained in this process from the initial (or a checkpoint's) global payload.

    Returns the updates, the layout and that global payload.
    """
    cfg = load_config(config, [f"data.alpha={alpha}", "progress=false", "train.routing_stats=after", *overrides])
    prepared = prepare(cfg)
    engine = engine_spec(cfg, prepared)()
    if checkpoint is None:
        payload, round_idx = engine.initial_payload, 1
    else:
        saved = load_checkpoint(Path(checkpoint))
        payload, round_idx = saved.payload, saved.round_idx + 1
    updates = []
    for client in range(cfg.data.num_clients):
        instructions = ClientInstructions(client_id=client, round_idx=round_idx,
                                          seed=client_seed(cfg.seed, round_idx, client))
        update = engine.train(prepared.partitions[client], payload, instructions)
        if update is not None:
            updates.append(update)
    return updates, engine.layout, payload


def main() -> None:
    parser = argparse.ArgumentParser(description="FedAlign-MoE's alignment signals on one round of real updates")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--beta", type=float, default=1.0, help="β of the threshold τ = M − β·Σ (eq. 9)")
    parser.add_argument("--checkpoint", default=None, help="a run directory: start from its last global payload")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.pretrain.steps=3000")
    args = parser.parse_args()
    quiet_libraries()
    rows = []
    for alpha in args.alphas:
        updates, layout, payload = round_updates(args.config, alpha, args.overrides, args.checkpoint)
        rows.append({"alpha": alpha, **alignment_signals(updates, layout, payload, beta=args.beta)})
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "alignment_signals.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("sigma_same: σ of one expert between two clients; sigma_across: expert e on one client vs e+1 on another "
          "(different roles); excluded_pair_frac: counted pairs below τ; D_<space>: cosine of two clients' updates "
          "of one expert, on the LoRA factors or on the expert's effective weights; D_<space>_across: expert e on "
          "one client vs e+1 on another; separation: mean same − mean across; entropies in nats (log_N: all "
          "clients weigh the same)")


if __name__ == "__main__":
    main()
