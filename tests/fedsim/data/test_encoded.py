"""EncodedSplit / EncodedBatch: row access and padding trim."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np

from fedsim.data.encoded import EncodedSplit


def _split(tmp_path: Path) -> EncodedSplit:
    ds = datasets.Dataset.from_dict({
        "input_ids": [[5, 6, 7, 0, 0], [5, 6, 0, 0, 0], [8, 9, 9, 9, 0]],
        "attention_mask": [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]],
        "label_pos": [1, 0, 2],
        "label_token": [7, 6, 9],
        "label": [0, 1, 2],
    })
    ds.save_to_disk(str(tmp_path / "s"))
    return EncodedSplit.load(str(tmp_path / "s"))


def test_take_returns_requested_rows_in_order(tmp_path: Path) -> None:
    batch = _split(tmp_path).take(np.array([2, 0]))
    assert batch.label.tolist() == [2, 0] and batch.input_ids.dtype == np.int64


def test_trimmed_drops_only_all_padding_columns(tmp_path: Path) -> None:
    split = _split(tmp_path)
    assert split.take(np.array([0, 1])).trimmed().input_ids.tolist() == [[5, 6, 7], [5, 6, 0]]
    assert split.take(np.array([0, 1, 2])).trimmed().input_ids.shape == (3, 4)
