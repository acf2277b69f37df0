"""The default real-text task: 5-way topic classification from gensim's test data.

Five topics from four corpora that ship inside the gensim wheel (see
:mod:`fedsim.data.gensim_sources`), cut into examples of one length
distribution (see :mod:`fedsim.data.chunking`) so that a model must read the
words to tell the topics apart, and capped per class so that the classes are
roughly balanced and the whole corpus is a couple of thousand examples: small
enough for a CPU demo, large enough to split across tens of clients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

from aggregation.errors import ConfigError
from fedsim.data.chunking import normalize_words, passes_needed, round_robin_select, tile_spans
from fedsim.data.gensim_sources import (
    RawDocument,
    gensim_test_data_dir,
    read_lee,
    read_newsgroups,
    read_pang_lee,
    read_wikipedia,
)

LABEL_NAMES: list[str] = ["atheism", "space", "news", "movie", "wikipedia"]
"""Class names of :func:`load_topic_corpus`, in label order (label ``i`` is ``LABEL_NAMES[i]``)."""

CORPUS_FEATURES = Features(
    {
        "text": Value("string"),
        "label": ClassLabel(names=LABEL_NAMES),
        "doc_id": Value("string"),
        "source": Value("string"),
    }
)


def _read_all(data_dir: Path, sentences_per_review_doc: int) -> list[RawDocument]:
    return (
        read_newsgroups(data_dir)
        + read_lee(data_dir)
        + read_pang_lee(data_dir, sentences_per_doc=sentences_per_review_doc)
        + read_wikipedia(data_dir)
    )


def load_topic_corpus(
    *,
    seed: int = 0,
    max_per_class: int = 500,
    min_words: int = 24,
    max_words: int = 48,
    max_passes: int = 3,
    sentences_per_review_doc: int = 10,
    data_dir: Path | None = None,
) -> Dataset:
    """Build the 5-way topic classification corpus.

    Every document is normalised and cut into chunks of ``Uniform{min_words..
    max_words}`` words (punctuation marks count as words); a chunk keeps its
    document's ``doc_id``, so :func:`fedsim.data.split.split_by_document` can
    keep a document's chunks on one side. A class whose documents yield fewer
    than ``max_per_class`` chunks in one tiling is tiled again from other
    offsets (up to ``max_passes`` tilings: overlapping, never identical
    chunks); then each class is capped at ``max_per_class`` chunks taken
    round-robin over its documents. With the defaults the movie reviews (about
    4,300 words in all) remain the smallest class.

    Parameters
    ----------
    seed : int
        Seeds the chunk lengths, offsets and the per-class selection; the
        result is identical for equal arguments.
    max_per_class : int
        Cap on the number of chunks of one label.
    min_words, max_words : int
        Inclusive bounds on a chunk's length in words.
    max_passes : int
        Most tilings of one document (1: no overlapping chunks).
    sentences_per_review_doc : int
        Consecutive movie-review sentences grouped into one pseudo-document.
    data_dir : Path, optional
        Folder holding the gensim test files; default: the installed wheel's.

    Returns
    -------
    datasets.Dataset
        Columns ``text`` (str), ``label`` (ClassLabel over :data:`LABEL_NAMES`),
        ``doc_id`` (str), ``source`` (str: ``newsgroups``, ``lee_background``,
        ``lee``, ``pang_lee`` or ``enwiki``). Rows are ordered by label, then
        document, then position in the document.

    Raises
    ------
    ConfigError
        For chunk bounds or caps that cannot produce a corpus.
    DataError
        When the gensim test data cannot be found or read.
    """
    if not 1 <= min_words <= max_words:
        raise ConfigError(
            f"data.min_words/max_words: need 1 <= min_words <= max_words, got {min_words}, {max_words}"
        )
    if max_per_class < 1 or max_passes < 1 or sentences_per_review_doc < 1:
        raise ConfigError(
            "data: max_per_class, max_passes and sentences_per_review_doc must be >= 1, got "
            f"{max_per_class}, {max_passes}, {sentences_per_review_doc}"
        )
    rng = np.random.default_rng(seed)
    docs = _read_all(data_dir or gensim_test_data_dir(), sentences_per_review_doc)
    words = [normalize_words(d.text) for d in docs]

    rows: dict[str, list[Any]] = {"text": [], "label": [], "doc_id": [], "source": []}
    for label, name in enumerate(LABEL_NAMES):
        members = [i for i, d in enumerate(docs) if d.label_name == name]
        one_pass = sum(
            len(tile_spans(len(words[i]), rng, min_words=min_words, max_words=max_words))
            for i in members
        )
        passes = passes_needed(one_pass, max_per_class, max_passes)
        spans = [
            tile_spans(
                len(words[i]), rng, min_words=min_words, max_words=max_words, passes=passes
            )
            for i in members
        ]
        kept = round_robin_select([range(len(s)) for s in spans], max_per_class, rng)
        for i, doc_spans, chosen in zip(members, spans, kept, strict=True):
            for k in sorted(chosen, key=lambda k: doc_spans[k]):
                start, stop = doc_spans[k]
                rows["text"].append(" ".join(words[i][start:stop]))
                rows["label"].append(label)
                rows["doc_id"].append(docs[i].doc_id)
                rows["source"].append(docs[i].source)
    return Dataset.from_dict(rows, features=CORPUS_FEATURES)


def load_pretraining_texts(
    *, exclude_doc_ids: set[str], sentences_per_review_doc: int = 10, data_dir: Path | None = None
) -> list[str]:
    """Whole documents of the same corpora, unlabelled, for pretraining the demo's base.

    The classification corpus keeps a few hundred chunks per class; pretraining
    gets every word of every document (about 550k words, most of them
    Wikipedia), normalised as the chunks are, except the documents in
    ``exclude_doc_ids`` (the test split), so the base never reads a test text.
    A base pretrained on the capped chunks alone memorises them and transfers
    poorly to unseen documents.
    """
    docs = _read_all(data_dir or gensim_test_data_dir(), sentences_per_review_doc)
    return [" ".join(normalize_words(d.text)) for d in docs if d.doc_id not in exclude_doc_ids]
