"""Federated partitions through flwr-datasets' partitioners, as row indices."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from aggregation.errors import ConfigError, DataError
from fedsim.data import make_synthetic_corpus, partition, partition_hash


@pytest.fixture(scope="module")
def corpus() -> Dataset:
    """600 rows, 5 labels, 3 sources not aligned with the labels."""
    ds = make_synthetic_corpus(docs_per_label=120, words_per_doc=3, seed=0)
    sources = [f"site{i % 3}" for i in range(len(ds))]
    return ds.remove_columns("source").add_column("source", sources)


def _label_divergence(ds: Dataset, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    labels = np.asarray(ds["label"])
    overall = np.bincount(labels, minlength=5) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=5) / len(p) - overall).sum() for p in parts]))


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == n
    assert all(p.dtype == np.int64 and (np.diff(p) > 0).all() for p in parts)


class TestPartitionSuccess:
    @pytest.mark.parametrize(
        ("scheme", "kwargs"),
        [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("pathological", {"labels_per_client": 2})],
    )
    def test_parts_are_disjoint_sorted_and_cover_the_split(self, corpus, scheme, kwargs):
        parts = partition(corpus, scheme=scheme, num_clients=10, seed=0, **kwargs)
        assert len(parts) == 10
        _assert_disjoint_cover(parts, len(corpus))

    def test_iid_sizes_differ_by_at_most_one_and_rows_are_shuffled(self, corpus):
        parts = partition(corpus, scheme="iid", num_clients=7, seed=0)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert not np.array_equal(parts[0], np.arange(len(parts[0])))

    def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha(self, corpus):
        # Execute: mean over seeds of each client's distance to the global label mix
        def skew(alpha: float) -> float:
            runs = [partition(corpus, scheme="dirichlet", num_clients=10, seed=s, alpha=alpha) for s in range(3)]
            return float(np.mean([_label_divergence(corpus, parts) for parts in runs]))

        small, large = skew(0.1), skew(100.0)

        # Assert
        assert small > 0.4 > 0.1 > large, (small, large)

    @pytest.mark.parametrize("k", [1, 2, 3])
    def test_pathological_gives_each_client_k_labels(self, corpus, k):
        labels = np.asarray(corpus["label"])
        parts = partition(corpus, scheme="pathological", num_clients=10, seed=0, labels_per_client=k)
        assert [len(np.unique(labels[p])) for p in parts] == [k] * 10

    def test_natural_makes_one_client_per_source_in_sorted_order(self, corpus):
        # Execute
        parts = partition(corpus, scheme="natural", num_clients=3, seed=0)

        # Assert
        sources = np.asarray(corpus["source"])
        assert [set(sources[p]) for p in parts] == [{"site0"}, {"site1"}, {"site2"}]
        _assert_disjoint_cover(parts, len(corpus))

    @pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
    def test_same_seed_same_parts_other_seed_other_parts(self, corpus, scheme):
        a = partition(corpus, scheme=scheme, num_clients=5, seed=1)
        b = partition(corpus, scheme=scheme, num_clients=5, seed=1)
        c = partition(corpus, scheme=scheme, num_clients=5, seed=2)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert partition_hash(a) == partition_hash(b) != partition_hash(c)

    def test_partition_hash_is_short_hex_and_sees_where_parts_split(self):
        h = partition_hash([np.array([0, 1]), np.array([2])])
        assert len(h) == 16 and int(h, 16) >= 0
        assert h != partition_hash([np.array([0]), np.array([1, 2])])
        assert h == partition_hash([np.array([0, 1], dtype=np.int32), np.array([2], dtype=np.int32)])

    def test_dataset_without_label_column_can_be_split_iid(self):
        parts = partition(Dataset.from_dict({"x": [1, 2, 3, 4]}), scheme="iid", num_clients=2, seed=0)
        _assert_disjoint_cover(parts, 4)


class TestPartitionFailure:
    def test_data_error_names_client_and_counts_when_iid_clients_are_too_small(self, corpus):
        with pytest.raises(DataError) as info:
            partition(corpus, scheme="iid", num_clients=10, seed=0, min_examples=61)
        assert str(info.value) == (
            "data.min_examples: client 0 has 60 examples, fewer than min_examples=61; "
            "lower data.min_examples, raise data.alpha or use fewer clients"
        )

    def test_data_error_when_dirichlet_redraws_cannot_reach_min_examples(self, corpus):
        pattern = r"^data\.min_examples: client \d+ has \d+ examples, fewer than min_examples=50;"
        with pytest.raises(DataError, match=pattern):
            partition(corpus, scheme="dirichlet", num_clients=20, seed=0, alpha=0.05, min_examples=50)

    def test_config_error_names_num_clients_when_natural_count_differs(self, corpus):
        with pytest.raises(ConfigError, match=r"^data\.num_clients: .* 3, got num_clients=4"):
            partition(corpus, scheme="natural", num_clients=4, seed=0)

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"scheme": "shards"}, "data.partition"),
            ({"scheme": "iid", "num_clients": 0}, "data.num_clients"),
            ({"scheme": "dirichlet", "alpha": 0.0}, "data.alpha"),
            ({"scheme": "pathological", "labels_per_client": 6}, "data.labels_per_client"),
            ({"scheme": "dirichlet", "label_key": "topic"}, "data.label_key"),
        ],
    )
    def test_config_error_names_the_field_when_an_option_is_invalid(self, corpus, kwargs, field):
        options = {"num_clients": 4, "seed": 0, **kwargs}
        with pytest.raises(ConfigError, match=rf"^{field}:"):
            partition(corpus, **options)
