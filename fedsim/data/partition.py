"""Split a training set over federated clients with flwr-datasets' partitioners.

Flower's partitioners hand back ``Dataset`` partitions; fedsim's workers want
row indices (a client's data is a few integers to ship, and the manifest can
hash them). So a single index column is handed to the partitioner along with
the key it partitions by, and read back from each partition.

Schemes:

- ``iid``: rows shuffled with the seed, then cut into equal contiguous shards
  (``IidPartitioner``, which itself does not shuffle).
- ``dirichlet``: per label, shares over clients drawn from Dir(α)
  (``DirichletPartitioner``; Yurochkin et al. 2019, arXiv:1905.12022). Small α:
  each client sees few labels; large α: close to IID.
- ``pathological``: each client gets exactly ``labels_per_client`` labels
  (``PathologicalPartitioner`` in the "first-deterministic" mode of Li et al.
  2021, arXiv:2102.02079, which uses every label once there are enough clients).
- ``natural``: one client per distinct value of ``source_key``
  (``NaturalIdPartitioner``), clients ordered by sorted value.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from aggregation.errors import ConfigError, DataError

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological", "natural")
_ROW = "__fedsim_row__"


def _make_partitioner(
    scheme: str,
    *,
    num_clients: int,
    seed: int,
    alpha: float,
    labels_per_client: int,
    label_key: str,
    source_key: str,
    min_examples: int,
) -> Partitioner:
    if scheme == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=label_key,
            alpha=float(alpha),
            min_partition_size=min_examples,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if scheme == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by=label_key,
            num_classes_per_partition=labels_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    return NaturalIdPartitioner(partition_by=source_key)


def _validate(
    ds: Dataset,
    scheme: str,
    *,
    num_clients: int,
    alpha: float,
    labels_per_client: int,
    label_key: str,
    source_key: str,
    min_examples: int,
) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"data.partition: unknown scheme {scheme!r}; use one of {list(SCHEMES)}")
    if num_clients < 1:
        raise ConfigError(f"data.num_clients: must be >= 1, got {num_clients}")
    if min_examples < 0:
        raise ConfigError(f"data.min_examples: must be >= 0, got {min_examples}")
    if num_clients > len(ds):
        raise DataError(
            f"data.num_clients: {num_clients} clients but only {len(ds)} examples to share"
        )
    key = source_key if scheme == "natural" else label_key
    if scheme != "iid" and key not in ds.column_names:
        field = "data.source_key" if scheme == "natural" else "data.label_key"
        raise ConfigError(f"{field}: column {key!r} not in dataset columns {ds.column_names}")
    if scheme == "dirichlet" and not (np.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"data.alpha: must be a positive number, got {alpha}")
    if scheme == "pathological":
        num_labels = len(ds.unique(label_key))
        if not 1 <= labels_per_client <= num_labels:
            raise ConfigError(
                f"data.labels_per_client: must be in [1, {num_labels}] (labels in the data), "
                f"got {labels_per_client}"
            )
    if scheme == "natural":
        num_sources = len(ds.unique(source_key))
        if num_clients != num_sources:
            raise ConfigError(
                f"data.num_clients: natural partitioning by {source_key!r} makes one client per "
                f"distinct value, {num_sources}, got num_clients={num_clients}"
            )


def partition(
    ds: Dataset,
    *,
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.1,
    labels_per_client: int = 2,
    label_key: str = "label",
    source_key: str = "source",
    min_examples: int = 1,
) -> list[np.ndarray]:
    """Assign the rows of ``ds`` to ``num_clients`` clients.

    Parameters
    ----------
    ds : datasets.Dataset
        The training split.
    scheme : {"iid", "dirichlet", "pathological", "natural"}
        How rows are assigned (see the module docstring).
    num_clients : int
        Number of clients; for ``natural`` it must equal the number of distinct
        ``source_key`` values.
    seed : int
        Seeds the partitioner; equal arguments give equal partitions.
    alpha : float
        Dirichlet concentration (``dirichlet`` only).
    labels_per_client : int
        Labels per client (``pathological`` only).
    label_key, source_key : str
        Columns partitioned by.
    min_examples : int
        Fewest rows a client may get. ``dirichlet`` redraws (up to 10 times)
        while a client falls short; any scheme then raises if one still does.

    Returns
    -------
    list of numpy.ndarray
        Per client, its sorted int64 row indices into ``ds``. The lists are
        disjoint; for ``iid``, ``dirichlet`` and ``natural`` they cover every
        row; ``pathological`` leaves out labels no client was given.

    Raises
    ------
    ConfigError
        For an unknown scheme or an invalid option (naming the ``data.`` field).
    DataError
        When a client has fewer than ``min_examples`` rows.
    """
    _validate(
        ds,
        scheme,
        num_clients=num_clients,
        alpha=alpha,
        labels_per_client=labels_per_client,
        label_key=label_key,
        source_key=source_key,
        min_examples=min_examples,
    )
    keep = [c for c in dict.fromkeys([label_key, source_key]) if c in ds.column_names]
    rows = np.arange(len(ds), dtype=np.int64)
    if keep:
        slim = ds.select_columns(keep).flatten_indices().add_column(_ROW, rows)
    else:
        slim = Dataset.from_dict({_ROW: rows})
    if scheme == "iid":
        slim = slim.shuffle(seed=seed)

    def make(min_size: int) -> Partitioner:
        return _make_partitioner(
            scheme,
            num_clients=num_clients,
            seed=seed,
            alpha=alpha,
            labels_per_client=labels_per_client,
            label_key=label_key,
            source_key=source_key,
            min_examples=min_size,
        )

    try:
        parts = _load_all(make(min_examples), slim, num_clients)
    except ValueError as exc:
        if scheme != "dirichlet":
            raise DataError(f"data.partition: {scheme} partitioning failed: {exc}") from exc
        # Flower gave up after 10 redraws; take the first draw to report its smallest client.
        parts = _load_all(make(0), slim, num_clients)
    sizes = [len(p) for p in parts]
    smallest = int(np.argmin(sizes))
    if sizes[smallest] < min_examples:
        raise DataError(
            f"data.min_examples: client {smallest} has {sizes[smallest]} examples, fewer than "
            f"min_examples={min_examples}; lower data.min_examples, raise data.alpha or use "
            "fewer clients"
        )
    return parts


def _load_all(partitioner: Partitioner, slim: Dataset, num_clients: int) -> list[np.ndarray]:
    """Read each client's row indices back from the partitioner, quietly.

    Flower warns on every Dirichlet redraw (the caller checks the outcome
    instead) and ``NaturalIdPartitioner`` draws a tqdm bar on stderr. Other
    warnings (e.g. pathological labels no client got) pass through.
    """
    partitioner.dataset = slim
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        if isinstance(partitioner, DirichletPartitioner):
            warnings.simplefilter("ignore", UserWarning)
        return [
            np.sort(np.asarray(partitioner.load_partition(i)[_ROW], dtype=np.int64))
            for i in range(num_clients)
        ]


def partition_hash(parts: list[np.ndarray]) -> str:
    """Fingerprint a partition (short and stable) for the run manifest.

    The sha256 of each client's index array (as little-endian int64), in
    client order, with the client sizes, so ``[[0, 1], [2]]`` and
    ``[[0], [1, 2]]`` differ. First 16 hex digits.
    """
    digest = hashlib.sha256()
    for indices in parts:
        array = np.ascontiguousarray(indices, dtype="<i8")
        digest.update(np.int64(array.size).astype("<i8").tobytes())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]
