"""The synthetic multi-domain corpus for tests."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from aggregation.errors import ConfigError
from fedsim.data import make_synthetic_corpus, split_by_document, synthetic_label_names


class TestSyntheticCorpusSuccess:
    def test_shape_columns_and_ids(self, synthetic_corpus):
        assert synthetic_corpus.column_names == ["text", "label", "doc_id", "source"]
        assert len(synthetic_corpus) == 200
        assert synthetic_corpus.features["label"].names == synthetic_label_names(5)
        np.testing.assert_array_equal(np.bincount(synthetic_corpus["label"]), [40] * 5)
        assert len(set(synthetic_corpus["doc_id"])) == 200
        assert all(len(t.split()) == 30 for t in synthetic_corpus["text"])
        assert sorted(set(synthetic_corpus["source"])) == [f"domain{k}" for k in range(5)]

    def test_same_seed_same_text_other_seed_other_text(self, synthetic_corpus):
        again = make_synthetic_corpus(docs_per_label=40, words_per_doc=30, seed=0)
        other = make_synthetic_corpus(docs_per_label=40, words_per_doc=30, seed=1)
        assert again["text"] == synthetic_corpus["text"]
        assert other["text"] != synthetic_corpus["text"]

    def test_bag_of_words_nearest_centroid_separates_the_domains(self, synthetic_corpus):
        # Prepare
        train, test = split_by_document(synthetic_corpus, test_fraction=0.25, seed=0)
        vocab = sorted({w for t in synthetic_corpus["text"] for w in t.split()})
        index = {w: i for i, w in enumerate(vocab)}

        def bow(texts):
            x = np.zeros((len(texts), len(vocab)))
            for r, t in enumerate(texts):
                for w, c in Counter(t.split()).items():
                    x[r, index[w]] = c
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        x_train, y_train = bow(train["text"]), np.asarray(train["label"])
        centroids = np.stack([x_train[y_train == k].mean(0) for k in range(5)])

        # Execute
        pred = (bow(test["text"]) @ centroids.T).argmax(1)

        # Assert
        assert (pred == np.asarray(test["label"])).mean() == 1.0


class TestSyntheticCorpusFailure:
    @pytest.mark.parametrize("field", ["num_labels", "docs_per_label", "words_per_doc"])
    def test_config_error_when_a_size_is_zero(self, field):
        kwargs = {"num_labels": 5, "docs_per_label": 2, "words_per_doc": 3, field: 0}
        with pytest.raises(ConfigError, match=f"data.synthetic.{field}"):
            make_synthetic_corpus(seed=0, **kwargs)
