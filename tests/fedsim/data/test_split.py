"""Train/test split by document, stratified by label."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from aggregation.errors import ConfigError, DataError
from fedsim.data import split_by_document


class TestSplitByDocumentSuccess:
    def test_no_document_is_on_both_sides_and_rows_are_covered(self, topic_corpus):
        # Execute
        train, test = split_by_document(topic_corpus, test_fraction=0.2, seed=0)

        # Assert
        assert not set(train["doc_id"]) & set(test["doc_id"])
        assert len(train) + len(test) == len(topic_corpus)
        assert sorted([*train["text"], *test["text"]]) == sorted(topic_corpus["text"])

    def test_every_label_is_on_both_sides_near_the_requested_fraction(self, topic_corpus):
        train, test = split_by_document(topic_corpus, test_fraction=0.2, seed=0)
        n_train = np.bincount(train["label"], minlength=5)
        n_test = np.bincount(test["label"], minlength=5)
        assert (n_train > 0).all() and (n_test > 0).all()
        share = n_test / (n_train + n_test)
        assert ((share >= 0.2) & (share < 0.3)).all(), share

    def test_same_seed_same_split_other_seed_other_split(self, topic_corpus):
        _, a = split_by_document(topic_corpus, test_fraction=0.2, seed=3)
        _, b = split_by_document(topic_corpus, test_fraction=0.2, seed=3)
        _, c = split_by_document(topic_corpus, test_fraction=0.2, seed=4)
        assert a["doc_id"] == b["doc_id"]
        assert set(a["doc_id"]) != set(c["doc_id"])

    def test_two_documents_per_label_put_one_on_each_side_even_for_a_tiny_fraction(self):
        # Prepare
        ds = Dataset.from_dict({"doc_id": ["a", "a", "b", "c", "d"], "label": [0, 0, 0, 1, 1], "text": ["x"] * 5})

        # Execute
        train, test = split_by_document(ds, test_fraction=0.01, seed=0)

        # Assert
        assert sorted(set(train["label"])) == sorted(set(test["label"])) == [0, 1]
        assert len(set(test["doc_id"])) == 2


class TestSplitByDocumentFailure:
    @pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
    def test_config_error_when_fraction_is_outside_the_open_unit_interval(self, synthetic_corpus, fraction):
        with pytest.raises(ConfigError, match="data.test_fraction"):
            split_by_document(synthetic_corpus, test_fraction=fraction, seed=0)

    def test_data_error_when_a_label_has_one_document(self):
        ds = Dataset.from_dict({"doc_id": ["a", "a", "b", "c"], "label": [0, 0, 1, 1], "text": ["x"] * 4})
        with pytest.raises(DataError, match="label 0 has 1 document"):
            split_by_document(ds, test_fraction=0.5, seed=0)
