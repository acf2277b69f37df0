"""What FedAlign-MoE's direction consensus D costs, in factor space and in function space, per round.

D (eq. 8) is a Gram matrix per expert over the cohort's slices of that expert.
In factor space it is one float32 syrk of the [N, |θ(e)|] block; in function
space (``aggregation.function_space``) two syrks of r rows per client and
adapted matrix, r times the arithmetic. Every expert of a layout has the same
shape, so the round's cost is one expert's, timed on a synthetic slice × cohort,
times the number of experts; the peak is the memory D allocates beyond the
slice × cohort block the aggregator already holds (numpy's allocations, traced).

    python benchmarks/consensus_cost.py --shapes demo olmoe-1b-7b --clients 10 50 100
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the aggregator's default: one BLAS thread (workers.aggregator_cpus)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.aggregate's layouts

import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from aggregation import function_space as fs  # noqa: E402
from aggregation import semantic_alignment as sa  # noqa: E402
from benchmarks.aggregate import SHAPES, real_layout  # noqa: E402


def _best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, float]:
    """(fastest seconds of ``repeats`` calls, peak MiB numpy allocated during one call)."""
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return min(seconds), peak / 2**20


def cost_table(shape: str, sizes: list[int], repeats: int) -> pd.DataFrame:
    """One row per cohort size: D's seconds per expert and per round in both spaces, and their extra memory."""
    layout, _ = real_layout(shape)
    keys = layout.expert_keys()
    lo, hi = layout.expert_span(*keys[0])
    factors = fs.expert_factors(layout.select(role="expert", layer=keys[0][0], expert=keys[0][1]))
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 0.02, hi - lo).astype(np.float32)  # a trained start: B ≠ 0
    rows = []
    for n in sizes:
        deltas = rng.normal(0.0, 1e-3, (n, hi - lo)).astype(np.float32)
        factor_s, factor_mib = _best_of(repeats, lambda d=deltas: sa.slice_gram(d))
        function_s, function_mib = _best_of(repeats, lambda d=deltas: fs.function_gram(d, base, factors))
        rows.append({
            "shape": shape, "clients": n, "experts": len(keys), "adapted_matrices": len(factors.pairs),
            "slice_cohort_mib": deltas.nbytes / 2**20,
            "factors_ms": 1e3 * factor_s, "function_ms": 1e3 * function_s,
            "function_over_factors": function_s / factor_s,
            "factors_round_s": factor_s * len(keys), "function_round_s": function_s * len(keys),
            "factors_extra_mib": factor_mib, "function_extra_mib": function_mib,
        })
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["demo", "olmoe-1b-7b"],
                        choices=[*SHAPES, "olmoe-1b-7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "switch-base-16"])
    parser.add_argument("--clients", nargs="+", type=int, default=[10, 50, 100])
    parser.add_argument("--repeats", type=int, default=3, help="the fastest of this many calls is reported")
    parser.add_argument("--csv", help="also write the table here")
    args = parser.parse_args()
    table = pd.concat([cost_table(s, args.clients, args.repeats) for s in args.shapes], ignore_index=True)
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
