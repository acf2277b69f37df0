"""Train/test split by document, stratified by label.

Chunks of one document share vocabulary, names and phrasing; a chunk in the
test set whose siblings were trained on measures memorisation, not
generalisation. So whole documents go to one side, and the documents of each
label are split separately so that every label is present on both sides.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from datasets import Dataset

from aggregation.errors import ConfigError, DataError


def split_by_document(
    ds: Dataset,
    *,
    test_fraction: float,
    seed: int,
    doc_key: str = "doc_id",
    label_key: str = "label",
) -> tuple[Dataset, Dataset]:
    """Split ``ds`` into train and test with no document on both sides.

    For each label, its documents are shuffled and moved to the test side
    until the test side holds at least ``test_fraction`` of the label's rows;
    at least one document goes to each side. A document whose rows carry
    several labels is filed under its most frequent one.

    Parameters
    ----------
    ds : datasets.Dataset
        Rows with a document id and a label column.
    test_fraction : float
        Target share of each label's rows in the test split, in (0, 1).
    seed : int
        Seeds the document shuffle; the split is identical for equal seeds.
    doc_key, label_key : str
        Column names of the document id and the label.

    Returns
    -------
    (train, test) : tuple of datasets.Dataset
        Row subsets of ``ds`` in their original order.

    Raises
    ------
    ConfigError
        When ``test_fraction`` is outside (0, 1).
    DataError
        When a label has a single document (it cannot be on both sides).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction: must be in (0, 1), got {test_fraction}")
    columns = ds.select_columns([doc_key, label_key]).with_format("numpy")
    docs, labels = columns[doc_key], columns[label_key]
    rows_of_doc: dict[str, list[int]] = defaultdict(list)
    for row, doc in enumerate(docs):
        rows_of_doc[str(doc)].append(row)

    docs_of_label: dict[object, list[str]] = defaultdict(list)
    for doc, rows in rows_of_doc.items():
        values, counts = np.unique(labels[rows], return_counts=True)
        docs_of_label[values[np.argmax(counts)].item()].append(doc)

    rng = np.random.default_rng(seed)
    test_rows: list[int] = []
    for label in sorted(docs_of_label, key=str):
        label_docs = sorted(docs_of_label[label])
        if len(label_docs) < 2:
            raise DataError(
                f"label {label!r} has {len(label_docs)} document(s); a split by document "
                "needs at least 2 per label"
            )
        total = sum(len(rows_of_doc[d]) for d in label_docs)
        taken, moved = 0, 0
        for j in rng.permutation(len(label_docs)):
            if moved and (taken >= test_fraction * total or moved == len(label_docs) - 1):
                break
            rows = rows_of_doc[label_docs[j]]
            test_rows += rows
            taken += len(rows)
            moved += 1
    is_test = np.zeros(len(ds), dtype=bool)
    is_test[test_rows] = True
    return ds.select(np.flatnonzero(~is_test)), ds.select(np.flatnonzero(is_test))
