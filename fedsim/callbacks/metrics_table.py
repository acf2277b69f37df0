"""Round, client, communication and routing tables of a run, on disk after every round.

``rounds`` (one row per round) is small and rewritten whole. The per-client
tables grow with clients × rounds (``comm`` by payload class, ``routing`` by
expert), so each round appends one part file to a parquet dataset directory
(``clients.parquet/round-000001.parquet``, …; ``pandas.read_parquet`` reads
the directory as one table) and a run never rewrites or holds them: the cost
of a round's bookkeeping does not grow with the rounds before it. What is on
disk is complete up to the last finished round, even if the run dies in the
next one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fedsim.callbacks.base import Callback, RoundRecord

_GROWING = ("clients", "comm", "routing")


class MetricsTable(Callback):
    """The run's tables on disk, rewritten or appended to after every round.

    ``rounds`` has one row per round, ``clients`` one row per client-round, ``comm`` one row per
    client-round, direction and payload class, and ``routing`` one row per round, layer and expert.
    """

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self.run_dir: Path | None = None

    @classmethod
    def read(cls, run_dir: Path, *, up_to_round: int) -> MetricsTable:
        """The tables a run wrote, cut back to rounds ≤ ``up_to_round`` (a resumed run writes the rest)."""
        table = cls()
        table.run_dir = run_dir
        path = run_dir / "rounds.parquet"
        if path.exists():
            frame = pd.read_parquet(path)
            table.rounds = frame[frame["round"] <= up_to_round].to_dict("records")
        for name in _GROWING:
            parts = run_dir / f"{name}.parquet"
            if parts.is_file():  # a table written whole by an older fedsim: split it into parts
                frame = pd.read_parquet(parts)
                parts.unlink()
                for r, rows in frame.groupby("round"):
                    table._append(name, int(r), rows)
            for part in sorted(parts.glob("round-*.parquet")) if parts.is_dir() else []:
                if int(part.stem.removeprefix("round-")) > up_to_round:
                    part.unlink()
        table._rewrite_clients_csv()
        return table

    def on_run_begin(self, *, run_dir: Path, total_rounds: int) -> None:
        """Remember ``run_dir``, where the tables are written."""
        self.run_dir = run_dir

    def on_round_closed(self, record: RoundRecord, *, stopping: bool) -> None:
        """Append the round's final row (every callback's metrics in it) and its client, comm and routing parts."""
        self.rounds.append(dict(record.row))
        if self.run_dir is not None:
            for name, rows in (("clients", record.clients), ("comm", record.comm), ("routing", record.routing)):
                if rows:
                    self._append(name, record.round_idx, pd.DataFrame([{"round": record.round_idx, **r} for r in rows]))
            self._write_rounds()

    def rounds_frame(self) -> pd.DataFrame:
        """The ``rounds`` table, one row per round."""
        return pd.DataFrame(self.rounds)

    def clients_frame(self) -> pd.DataFrame:
        """The ``clients`` table read back from its parts, one row per client-round, sorted by round."""
        return self._read("clients")

    def comm_frame(self) -> pd.DataFrame:
        """The ``comm`` table read back from its parts, one row per client-round, direction and payload class."""
        return self._read("comm")

    # -- files -----------------------------------------------------------------------------------------
    def _append(self, name: str, round_idx: int, frame: pd.DataFrame) -> None:
        assert self.run_dir is not None
        folder = self.run_dir / f"{name}.parquet"
        folder.mkdir(exist_ok=True)
        tmp = folder / f".round-{round_idx:06d}.tmp"
        frame.to_parquet(tmp, index=False)
        tmp.replace(folder / f"round-{round_idx:06d}.parquet")
        if name == "clients":  # the csv copy grows by appending
            csv = self.run_dir / "clients.csv"
            frame.to_csv(csv, mode="a", header=not csv.exists(), index=False)

    def _write_rounds(self) -> None:
        assert self.run_dir is not None
        frame = pd.DataFrame(self.rounds)
        tmp = self.run_dir / ".rounds.parquet.tmp"
        frame.to_parquet(tmp, index=False)
        tmp.replace(self.run_dir / "rounds.parquet")
        frame.to_csv(self.run_dir / "rounds.csv", index=False)

    def _rewrite_clients_csv(self) -> None:
        """The csv copy of the clients table, from its parquet parts (after a resume cut the parts back)."""
        assert self.run_dir is not None
        csv = self.run_dir / "clients.csv"
        csv.unlink(missing_ok=True)
        frame = self._read("clients")
        if len(frame):
            frame.to_csv(csv, index=False)

    def _read(self, name: str) -> pd.DataFrame:
        folder = None if self.run_dir is None else self.run_dir / f"{name}.parquet"
        if folder is None or not folder.is_dir() or not any(folder.glob("round-*.parquet")):
            return pd.DataFrame()
        return pd.read_parquet(folder).sort_values("round", kind="stable").reset_index(drop=True)

