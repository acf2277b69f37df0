"""Is the demo task meaningful? Central LoRA vs FedAvg at α = 1.0 and α = 0.1 on the demo base.

Prints, for the demo's pretrained base and data:
- central LoRA test accuracy (one client holding the whole training split, no federation);
- FedAvg accuracy at each α: mean of the last 5 rounds and mean of rounds 1–5, over seeds;
- how far the clients' routing distributions diverge: mean pairwise total variation of p̄ at each α.

    .venv/bin/python benchmarks/demo_task.py            # 3 seeds, the demo's rounds
    .venv/bin/python benchmarks/demo_task.py --quick    # 1 seed, 6 rounds
    .venv/bin/python benchmarks/demo_task.py --central-only --central-epochs 10   # the central curve alone
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from fedsim import environment  # noqa: E402

environment.apply()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402

from actors import EMBEDDED_SYSTEM_CONFIG  # noqa: E402
from aggregation.messages import ClientInstructions  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.driver import run  # noqa: E402
from fedsim.engine.torch_engine import TorchEngineSpec  # noqa: E402
from fedsim.prepare import prepare  # noqa: E402
from fedsim.quiet import quiet_libraries  # noqa: E402


def central_accuracy(config: str, epochs: int, overrides: list[str]) -> list[float]:
    """Central LoRA: the torch engine trains one 'client' holding every training example; test accuracy per epoch."""
    cfg = load_config(config, ["progress=false", *overrides])
    prepared = prepare(cfg)
    engine = TorchEngineSpec(
        base_path=prepared.base_path, train_path=prepared.train_path, test_path=prepared.test_path,
        label_token_ids=prepared.label_token_ids, lora=cfg.lora,
        train=cfg.train.model_copy(update={"routing_stats": "off"}),
        threads=os.cpu_count() or 1, lora_seed=cfg.seed,
    )()
    payload = engine.initial_payload
    everyone = np.arange(prepared.n_train)
    chunks = [(lo, min(lo + 64, prepared.n_test)) for lo in range(0, prepared.n_test, 64)]
    accuracies = []
    for epoch in range(1, epochs + 1):
        update = engine.train(everyone, payload, ClientInstructions(client_id=0, round_idx=epoch, seed=epoch))
        payload = payload + update.delta
        res = engine.evaluate(payload, chunks)
        accuracies.append(sum(c.correct for c in res) / sum(c.count for c in res))
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description="demo task check")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--central-epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 rounds, 1 central epoch")
    parser.add_argument("--central-only", action="store_true", help="central LoRA only, its accuracy after every epoch")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    quiet_libraries()
    if args.quick:
        args.seeds, args.rounds, args.central_epochs = 1, args.rounds or 6, 1
    work = Path(tempfile.mkdtemp(prefix="fedsim-demo-task-"))
    central = central_accuracy(args.config, args.central_epochs, args.overrides)
    print("central LoRA test accuracy by epoch: " + ", ".join(f"{a:.3f}" for a in central), flush=True)
    if args.central_only:
        return
    rows = [{"setting": "central LoRA", "alpha": float("nan"), "seeds": 1, "final_acc_mean": central[-1],
             "final_acc_std": 0.0, "early_acc_mean": float("nan"), "routing_tv": float("nan")}]
    curves = []
    ray.init(address="local", include_dashboard=False, logging_level="WARNING", _system_config=EMBEDDED_SYSTEM_CONFIG)
    try:
        for alpha in (1.0, 0.1):
            finals, early, tvs = [], [], []
            for seed in range(args.seeds):
                # FedAvg, statistics off the training passes: the demo config's strategy when these figures were taken
                extra = ["strategy.name=fedavg", "train.routing_stats=during", f"data.alpha={alpha}", f"seed={seed}",
                         "progress=false", *args.overrides]
                if args.rounds:
                    extra.append(f"rounds={args.rounds}")
                cfg = load_config(args.config, extra)
                rounds = run(cfg, out=work / f"a{alpha}-s{seed}").rounds
                curves.append(rounds.assign(alpha=alpha, seed=seed))
                finals.append(rounds["test_accuracy"].tail(5).mean())
                early.append(rounds["test_accuracy"].head(5).mean())
                tvs.append(rounds["routing_tv"].mean())
            rows.append({"setting": "FedAvg", "alpha": alpha, "seeds": args.seeds,
                         "final_acc_mean": float(np.mean(finals)), "final_acc_std": float(np.std(finals)),
                         "early_acc_mean": float(np.mean(early)), "routing_tv": float(np.mean(tvs))})
    finally:
        ray.shutdown()
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "demo_task.csv", index=False)
    pd.concat(curves).to_csv(out / "demo_task_curves.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("final_acc: mean test accuracy of the last 5 rounds; early_acc: rounds 1-5; "
          "routing_tv: mean pairwise total variation of clients' routing distributions")


if __name__ == "__main__":
    main()
