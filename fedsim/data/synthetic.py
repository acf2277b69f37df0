"""A synthetic multi-domain corpus a tiny model learns in a few steps (for tests).

Each label is a domain with its own small vocabulary of made-up words; every
document mixes words of its domain with filler words shared by all domains.
A bag-of-words model separates the domains perfectly, and a tiny language
model gets there in a few hundred steps, so tests of training, aggregation and
evaluation can assert that accuracy rises without a real corpus.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

from aggregation.errors import ConfigError

FILLER_WORDS: tuple[str, ...] = (
    "the", "a", "of", "and", "to", "in", "is", "that", "it", "was",
    "for", "on", "with", "as", "this", "by", "at", "from", "or", "but",
)  # fmt: skip
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")


def synthetic_label_names(num_labels: int) -> list[str]:
    """Return the names of the synthetic domains: ``["topic0", "topic1", ...]``."""
    return [f"topic{k}" for k in range(num_labels)]


def _domain_vocabularies(
    num_labels: int, words_per_label: int, rng: np.random.Generator
) -> list[list[str]]:
    """Draw disjoint sets of 3-syllable pseudo-words, one set per domain."""
    seen: set[str] = set(FILLER_WORDS)
    vocabularies: list[list[str]] = []
    for _ in range(num_labels):
        words: list[str] = []
        while len(words) < words_per_label:
            word = "".join(
                _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                for _ in range(3)
            )
            if word not in seen:
                seen.add(word)
                words.append(word)
        vocabularies.append(words)
    return vocabularies


def make_synthetic_corpus(
    *,
    num_labels: int = 5,
    docs_per_label: int,
    words_per_doc: int,
    seed: int,
    words_per_label: int = 12,
    topic_share: float = 0.5,
) -> Dataset:
    """Make a corpus of ``num_labels`` domains with the corpus columns.

    A document of label ``k`` draws each word from domain ``k``'s vocabulary
    with probability ``topic_share`` (Zipf-like weights, so some words are
    typical) and otherwise from :data:`FILLER_WORDS` (uniform).

    Parameters
    ----------
    num_labels : int
        Number of domains (labels ``0..num_labels-1``).
    docs_per_label : int
        Documents per domain; each is one row.
    words_per_doc : int
        Words per document.
    seed : int
        Seeds vocabularies and text; equal arguments give an equal corpus.
    words_per_label : int
        Size of each domain's own vocabulary.
    topic_share : float
        Probability that a word comes from the domain vocabulary, in (0, 1].

    Returns
    -------
    datasets.Dataset
        Columns ``text``, ``label`` (ClassLabel over
        :func:`synthetic_label_names`), ``doc_id`` (``"synthetic/<k>/<i>"``,
        unique) and ``source`` (``"domain<k>"``, so a natural partition by
        source is a partition by domain). Rows are interleaved by label.

    Raises
    ------
    ConfigError
        For non-positive sizes or a ``topic_share`` outside (0, 1].
    """
    for name, value in (
        ("num_labels", num_labels),
        ("docs_per_label", docs_per_label),
        ("words_per_doc", words_per_doc),
        ("words_per_label", words_per_label),
    ):
        if value < 1:
            raise ConfigError(f"data.synthetic.{name}: must be >= 1, got {value}")
    if not 0.0 < topic_share <= 1.0:
        raise ConfigError(f"data.synthetic.topic_share: must be in (0, 1], got {topic_share}")
    rng = np.random.default_rng(seed)
    vocabularies = _domain_vocabularies(num_labels, words_per_label, rng)
    zipf = 1.0 / np.arange(1, words_per_label + 1)
    zipf /= zipf.sum()
    filler = np.asarray(FILLER_WORDS)

    rows: dict[str, list[Any]] = {"text": [], "label": [], "doc_id": [], "source": []}
    for i in range(docs_per_label):
        for k, vocabulary in enumerate(vocabularies):
            from_topic = rng.random(words_per_doc) < topic_share
            topic_words = rng.choice(np.asarray(vocabulary), size=words_per_doc, p=zipf)
            filler_words = rng.choice(filler, size=words_per_doc)
            rows["text"].append(" ".join(np.where(from_topic, topic_words, filler_words)))
            rows["label"].append(k)
            rows["doc_id"].append(f"synthetic/{k}/{i}")
            rows["source"].append(f"domain{k}")
    features = Features(
        {
            "text": Value("string"),
            "label": ClassLabel(names=synthetic_label_names(num_labels)),
            "doc_id": Value("string"),
            "source": Value("string"),
        }
    )
    return Dataset.from_dict(rows, features=features)
