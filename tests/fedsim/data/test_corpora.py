"""The 5-way topic corpus built from gensim's test data."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pytest

from aggregation.errors import ConfigError
from fedsim.data import LABEL_NAMES, load_pretraining_texts, load_topic_corpus


def _lengths(ds) -> np.ndarray:
    return np.array([len(t.split()) for t in ds["text"]])


class TestTopicCorpusSuccess:
    def test_columns_and_label_names_are_the_standard_ones(self, topic_corpus):
        assert topic_corpus.column_names == ["text", "label", "doc_id", "source"]
        assert topic_corpus.features["label"].names == LABEL_NAMES
        assert LABEL_NAMES == ["atheism", "space", "news", "movie", "wikipedia"]
        assert set(topic_corpus["source"]) == {"newsgroups", "lee_background", "lee", "pang_lee", "enwiki"}

    def test_classes_are_roughly_balanced_under_the_cap(self, topic_corpus):
        counts = np.bincount(topic_corpus["label"], minlength=5)
        assert counts.max() <= 500
        assert counts.min() >= 250  # movie reviews, the smallest source, after re-tiling
        assert 2000 <= counts.sum() <= 3000

    def test_chunk_length_is_bounded_and_distributed_alike_for_every_class(self, topic_corpus):
        # Prepare
        lengths = _lengths(topic_corpus)
        labels = np.asarray(topic_corpus["label"])

        # Assert: same bounds and nearly the same mean (Uniform{24..48}: mean 36, sd 7.2)
        assert lengths.min() >= 24 and lengths.max() <= 48
        means = [lengths[labels == k].mean() for k in range(5)]
        assert max(means) - min(means) < 2.0, means

    def test_length_alone_predicts_the_class_barely_better_than_the_majority_guess(self, topic_corpus):
        # Prepare: the best classifier that sees only the length (majority label per length)
        lengths = _lengths(topic_corpus)
        labels = np.asarray(topic_corpus["label"])
        correct = sum(Counter(labels[lengths == n]).most_common(1)[0][1] for n in np.unique(lengths))

        # Assert: its in-sample accuracy stays near the majority-class share (~0.22)
        assert correct / len(labels) < 0.32

    def test_every_document_has_one_label_and_one_source(self, topic_corpus):
        label_of, source_of = {}, {}
        columns = (topic_corpus["doc_id"], topic_corpus["label"], topic_corpus["source"])
        for doc, label, source in zip(*columns, strict=True):
            assert label_of.setdefault(doc, label) == label
            assert source_of.setdefault(doc, source) == source
        docs_per_label = Counter(label_of.values())
        assert docs_per_label[LABEL_NAMES.index("movie")] == 20  # 200 sentences in groups of 10
        assert docs_per_label[LABEL_NAMES.index("news")] == 350

    def test_text_is_lower_case_ascii_with_single_spaces(self, topic_corpus):
        for text in topic_corpus["text"][::50]:
            assert text == text.lower() and text.isascii()
            assert text == " ".join(text.split())

    def test_same_seed_gives_same_corpus_and_prints_nothing(self, topic_corpus, capfd):
        # Execute
        again = load_topic_corpus(seed=0)

        # Assert
        assert again["text"] == topic_corpus["text"]
        assert again["doc_id"] == topic_corpus["doc_id"]
        assert capfd.readouterr() == ("", "")
        assert "gensim" not in sys.modules

    def test_other_seed_cuts_other_chunks_and_small_cap_spreads_over_documents(self, topic_corpus):
        # Execute
        small = load_topic_corpus(seed=1, max_per_class=40)

        # Assert: exactly the cap per class, no two chunks from one document while others are unused
        np.testing.assert_array_equal(np.bincount(small["label"]), [40] * 5)
        assert not set(small["text"]) <= set(topic_corpus["text"])
        news = LABEL_NAMES.index("news")
        docs = Counter(d for d, y in zip(small["doc_id"], small["label"], strict=True) if y == news)
        assert max(docs.values()) == 1


class TestTopicCorpusFailure:
    def test_config_error_when_min_words_exceeds_max_words(self):
        with pytest.raises(ConfigError, match="data.min_words/max_words"):
            load_topic_corpus(min_words=50, max_words=40)

    def test_config_error_when_cap_is_zero(self):
        with pytest.raises(ConfigError, match="max_per_class"):
            load_topic_corpus(max_per_class=0)


def test_load_pretraining_texts_excludes_the_given_documents(topic_corpus) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    excluded = set(topic_corpus.filter(lambda r: r["label"] == 3)["doc_id"])  # every movie-review document
    # Execute
    everything = load_pretraining_texts(exclude_doc_ids=set())
    kept = load_pretraining_texts(exclude_doc_ids=excluded)
    # Assert
    assert len(everything) - len(kept) == len(excluded)
    assert sum(len(t.split()) for t in everything) > 500_000  # whole documents, not the capped chunks
