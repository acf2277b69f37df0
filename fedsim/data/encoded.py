"""An encoded (tokenized) split on disk, memory-mapped by every worker.

The driver encodes once and saves with ``datasets``' ``save_to_disk``; workers
``load_from_disk`` (Arrow, memory-mapped), so a client's rows are read only
when that client trains, never the whole federation into each worker's heap.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

COLUMNS = ("input_ids", "attention_mask", "label_pos", "label_token", "label")


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """Columns of some rows as numpy arrays."""

    input_ids: np.ndarray  # [B, L] int64
    attention_mask: np.ndarray  # [B, L] int64
    label_pos: np.ndarray  # [B] int64, position whose next token is the label word
    label_token: np.ndarray  # [B] int64, the label word's token id
    label: np.ndarray  # [B] int64, class index

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def rows(self, idx: np.ndarray) -> EncodedBatch:
        """The rows ``idx`` (integer indices [n] or a boolean mask [B]) of every column."""
        return EncodedBatch(*(getattr(self, c)[idx] for c in COLUMNS))

    def trimmed(self) -> EncodedBatch:
        """The same rows without the padding columns every row has (rows are right-padded).

        A causal model's outputs at real tokens do not depend on trailing padding,
        so dropping it only saves compute.
        """
        width = int(self.attention_mask.sum(axis=1).max(initial=1))
        if width >= self.input_ids.shape[1]:
            return self
        return EncodedBatch(
            self.input_ids[:, :width], self.attention_mask[:, :width], self.label_pos, self.label_token, self.label
        )


class EncodedSplit:
    """Read-only view over an encoded split saved with ``save_to_disk``."""

    def __init__(self, ds: datasets.Dataset) -> None:
        missing = [c for c in COLUMNS if c not in ds.column_names]
        if missing:
            raise ValueError(f"encoded split lacks columns {missing}")
        self._ds = ds.with_format("numpy", columns=list(COLUMNS))

    @classmethod
    def load(cls, path: str) -> EncodedSplit:
        """The split saved at ``path``, memory-mapped (``datasets.load_from_disk``)."""
        return cls(datasets.load_from_disk(path))

    def __len__(self) -> int:
        return len(self._ds)

    def take(self, rows: np.ndarray) -> EncodedBatch:
        """The given rows (any order) as int64 arrays."""
        got = self._ds[np.asarray(rows, dtype=np.int64)]
        return EncodedBatch(*(np.asarray(got[c], dtype=np.int64) for c in COLUMNS))
