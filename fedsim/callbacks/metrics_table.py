"""Round, client and communication tables of a run, written as parquet (and csv) after every round.

Rewriting both small tables each round keeps what is on disk complete up to
the last finished round, even if the run dies in the next one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fedsim.callbacks.base import Callback, RoundRecord


class MetricsTable(Callback):
    """Collects ``rounds`` (one row per round), ``clients`` (one row per client-round) and ``comm``
    (one row per client-round, direction and payload class: shared, router of a layer, expert of a layer,
    routing statistics) and ``routing`` (one row per round, layer and expert: the cohort's mean p̄ and its
    spread)."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []
        self.comm: list[dict[str, Any]] = []
        self.routing: list[dict[str, Any]] = []
        self.run_dir: Path | None = None

    @classmethod
    def read(cls, run_dir: Path, *, up_to_round: int) -> MetricsTable:
        """The tables a run wrote, cut back to rounds ≤ ``up_to_round`` (a resumed run rewrites the rest)."""
        table = cls()
        for name, rows in table._tables():
            path = run_dir / f"{name}.parquet"
            if path.exists():
                frame = pd.read_parquet(path)
                rows.extend(frame[frame["round"] <= up_to_round].to_dict("records"))
        return table

    def on_run_begin(self, *, run_dir: Path, total_rounds: int) -> None:
        self.run_dir = run_dir

    def after_round(self, record: RoundRecord) -> tuple[bool, dict[str, Any]]:
        self.rounds.append(dict(record.row))
        self.clients.extend({"round": record.round_idx, **c} for c in record.clients)
        self.comm.extend({"round": record.round_idx, **c} for c in record.comm)
        self.routing.extend({"round": record.round_idx, **c} for c in record.routing)
        self.write()
        return False, {}

    def rounds_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rounds)

    def clients_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.clients)

    def comm_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.comm)

    def _tables(self) -> tuple[tuple[str, list[dict[str, Any]]], ...]:
        return (("rounds", self.rounds), ("clients", self.clients), ("comm", self.comm), ("routing", self.routing))

    def write(self) -> None:
        if self.run_dir is None:
            return
        for name, rows in self._tables():
            frame = pd.DataFrame(rows)
            tmp = self.run_dir / f".{name}.parquet.tmp"
            frame.to_parquet(tmp, index=False)
            tmp.replace(self.run_dir / f"{name}.parquet")
            if name in ("rounds", "clients"):  # the long per-class and per-expert tables are parquet only
                frame.to_csv(self.run_dir / f"{name}.csv", index=False)
