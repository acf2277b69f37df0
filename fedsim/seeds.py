"""Seeds derived from the run's seed, so that a client's training never depends on where it runs."""

from __future__ import annotations

import numpy as np


def client_seed(run_seed: int, round_idx: int, client_id: int) -> int:
    """A client's training seed: a function of (run seed, round, client) only, never of the worker."""
    return int(np.random.SeedSequence([run_seed, round_idx, client_id]).generate_state(1)[0])
