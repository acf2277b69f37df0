"""Shared, session-scoped data for the data-layer tests (each built once: the corpus takes ~1 s)."""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import PreTrainedTokenizerFast

from fedsim.data import LABEL_NAMES, load_topic_corpus, make_synthetic_corpus, train_bpe_tokenizer


@pytest.fixture(scope="session")
def topic_corpus() -> Dataset:
    """The default real-text corpus with its default arguments (seed 0)."""
    return load_topic_corpus()


@pytest.fixture(scope="session")
def synthetic_corpus() -> Dataset:
    """5 domains x 40 documents of 30 words."""
    return make_synthetic_corpus(docs_per_label=40, words_per_doc=30, seed=0)


@pytest.fixture(scope="session")
def topic_tokenizer(topic_corpus: Dataset) -> PreTrainedTokenizerFast:
    """A 1,024-token BPE trained on the real corpus with the five label words."""
    return train_bpe_tokenizer(topic_corpus["text"], vocab_size=1024, label_words=LABEL_NAMES)
