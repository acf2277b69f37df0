"""Cut documents into examples whose length says nothing about their class.

The sources of the default corpus differ in length by two orders of magnitude
(a movie-review sentence has ~20 words, a Wikipedia article thousands) and in
surface form (case, spacing around punctuation). A classifier would learn those
instead of the topic, so every document is first normalised to the same form
(ASCII, lower case, words and punctuation marks separated by single spaces)
and then cut into chunks whose lengths are drawn from one distribution,
``Uniform{min_words..max_words}``, for every class.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|[.,;:!?()\"-]")


def normalize_words(text: str) -> list[str]:
    """Split ``text`` into lower-case ASCII words and punctuation marks.

    Accents are folded (``"é" -> "e"``), other characters dropped, and runs of
    one repeated mark (``"- - -"``, decorations in e-mail) collapsed to one.

    Examples
    --------
    >>> normalize_words("It's 4:00pm -- Café time!!")
    ["it's", '4', ':', '00pm', '-', 'cafe', 'time', '!']
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words: list[str] = []
    for token in _TOKEN.findall(ascii_text.lower()):
        if words and token == words[-1] and not token[0].isalnum():
            continue
        words.append(token)
    return words


def tile_spans(
    num_words: int,
    rng: np.random.Generator,
    *,
    min_words: int,
    max_words: int,
    passes: int = 1,
) -> list[tuple[int, int]]:
    """Cover a document of ``num_words`` words with chunks of random length.

    Each pass tiles the document left to right with lengths drawn i.i.d. from
    ``Uniform{min_words..max_words}``, dropping the tail once it is shorter than
    the next draw (a stopping rule that leaves the accepted lengths' distribution
    untouched). Passes after the first start at a random offset, so they cut the
    text at other places: a document too short to yield enough examples then
    yields overlapping but distinct chunks. Duplicate spans are dropped.

    Parameters
    ----------
    num_words : int
        Length of the document in words.
    rng : numpy.random.Generator
        Source of the chunk lengths and offsets.
    min_words, max_words : int
        Inclusive bounds of a chunk's length.
    passes : int
        Number of tilings.

    Returns
    -------
    list of (start, stop)
        Word spans, in the order they were cut.
    """
    spans: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for p in range(passes):
        pos = 0 if p == 0 else int(rng.integers(1, max_words))
        while True:
            length = int(rng.integers(min_words, max_words + 1))
            if pos + length > num_words:
                break
            span = (pos, pos + length)
            if span not in seen:
                seen.add(span)
                spans.append(span)
            pos += length
    return spans


def passes_needed(num_chunks: int, target: int, max_passes: int) -> int:
    """Count the tilings needed for ``num_chunks`` chunks per tiling to reach ``target``, capped."""
    if num_chunks <= 0:
        return 1
    return max(1, min(max_passes, math.ceil(target / num_chunks)))


def round_robin_select(
    items_per_doc: Sequence[Sequence[int]],
    cap: int,
    rng: np.random.Generator,
) -> list[list[int]]:
    """Pick at most ``cap`` items, spread as evenly as possible over documents.

    Documents are visited in a random order, taking one (randomly chosen) item
    from each per round, so a class capped below its supply keeps as many
    distinct documents as possible instead of filling up from a few long ones.

    Parameters
    ----------
    items_per_doc : sequence of sequence of int
        Candidate items (e.g. chunk numbers) of each document.
    cap : int
        Largest number of items kept in total.
    rng : numpy.random.Generator
        Source of the visiting order and of the choice inside each document.

    Returns
    -------
    list of list of int
        The kept items of each document, in their original order.
    """
    queues = [list(rng.permutation(np.asarray(items, dtype=np.int64))) for items in items_per_doc]
    order = rng.permutation(len(queues))
    kept: list[list[int]] = [[] for _ in queues]
    total = 0
    while total < cap and any(queues[d] for d in order):
        for d in order:
            if total >= cap:
                break
            if queues[d]:
                kept[d].append(int(queues[d].pop()))
                total += 1
    return [sorted(k) for k in kept]
