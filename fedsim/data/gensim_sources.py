"""Read the real text shipped in the gensim wheel's ``test/test_data`` folder.

Each reader returns whole source documents (:class:`RawDocument`); cutting them
into examples is :mod:`fedsim.data.chunking`'s job. gensim is located with
``importlib.util.find_spec`` and never imported (importing it pulls in scipy
and compiled extensions that fedsim does not otherwise need).

Sources (label name, file):

- ``atheism``, ``space``: newsgroups alt.atheism and sci.space, 100 posts each,
  in ``mini_newsgroup`` (a zlib-compressed Python 2 pickle, read with
  :mod:`fedsim.safe_pickle`). Headers, quoted replies and signatures are
  dropped so that what is left is the author's own text.
- ``news``: the Lee corpus of Australian news, ``lee_background.cor`` (300
  articles) and ``lee.cor`` (50), one article per line.
- ``movie``: Pang & Lee movie-review polarity sentences, ``pang_lee_polarity.cor``
  (200 sentences, one per line after a ``__label__pos``/``__label__neg`` tag).
  Consecutive sentences are grouped into pseudo-documents so that they can be
  cut into examples as long as the other sources'.
- ``wikipedia``: the articles (namespace 0, not redirects) of
  ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``.
"""

from __future__ import annotations

import bz2
import importlib.util
import pickle
import re
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregation.errors import DataError
from fedsim.data.wiki_markup import strip_wiki_markup
from fedsim.safe_pickle import NUMPY_ARRAYS, dict_subclasses, load_pickle

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True, slots=True)
class RawDocument:
    """One source document before chunking.

    Attributes
    ----------
    doc_id : str
        Unique across all sources, e.g. ``"lee_background/0017"``.
    label_name : str
        One of :data:`fedsim.data.corpora.LABEL_NAMES`.
    source : str
        The file family it came from (``newsgroups``, ``lee_background``,
        ``lee``, ``pang_lee``, ``enwiki``): a natural partition key that does not
        coincide with the label.
    text : str
        Raw text (markup and headers already removed).
    """

    doc_id: str
    label_name: str
    source: str
    text: str


def gensim_test_data_dir() -> Path:
    """Return the ``test/test_data`` folder of the installed gensim wheel.

    Raises
    ------
    DataError
        When gensim is not installed or its wheel lacks the folder.
    """
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("gensim is not installed: the default corpus lives in its wheel")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    if not path.is_dir():
        raise DataError(f"{path}: gensim's test data folder is missing")
    return path


# The six globals ``mini_newsgroup`` names (found with ``pickletools.genops``): scikit-learn's ``Bunch``,
# rebuilt as a plain dict without scikit-learn, and numpy's array reconstruction, answered with stand-ins.
_NEWSGROUPS_GLOBALS = {
    **dict_subclasses(("sklearn.datasets.base", "Bunch"), ("sklearn.utils", "Bunch")),
    **NUMPY_ARRAYS,
}


def load_newsgroups_bunch(path: Path) -> dict[str, Any]:
    """Load gensim's ``mini_newsgroup`` file as a plain dict.

    Parameters
    ----------
    path : Path
        The zlib-compressed, protocol-0 Python 2 pickle.

    Returns
    -------
    dict
        Keys ``data`` (list of str posts, headers included), ``target`` (int64
        array [n]), ``target_names`` (list of str), ``filenames`` (bytes array [n]).

    Raises
    ------
    DataError
        When the file is not the expected compressed pickle of a dict.
    """
    try:
        obj = load_pickle(zlib.decompress(path.read_bytes()), allow=_NEWSGROUPS_GLOBALS, encoding="latin1")
    except (zlib.error, pickle.UnpicklingError) as exc:
        raise DataError(f"{path}: not a readable newsgroups pickle ({exc})") from exc
    if not isinstance(obj, dict) or not {"data", "target", "target_names"} <= obj.keys():
        raise DataError(f"{path}: expected a dict with data/target/target_names")
    return obj


_QUOTE_OR_BOX = re.compile(r"^\s*[>|:/\\]")
_ATTRIBUTION = re.compile(r"(writes|wrote|said|says)\s*:\s*$", re.IGNORECASE)
_EMAIL = re.compile(r"\S+@\S+")


def _clean_post(post: str) -> str:
    """Keep a newsgroup post's subject and the author's own lines."""
    header, _, body = post.partition("\n\n")
    subject = ""
    for line in header.splitlines():
        if line.startswith("Subject:"):
            subject = re.sub(r"^(\s*re\s*:\s*)+", "", line[len("Subject:") :], flags=re.I)
    kept: list[str] = []
    for line in body.splitlines():
        if line.rstrip() in ("--", "-- "):
            break  # signature follows
        if _QUOTE_OR_BOX.match(line) or _ATTRIBUTION.search(line):
            continue
        kept.append(_EMAIL.sub("", line))
    return subject.strip() + "\n" + "\n".join(kept)


def read_newsgroups(data_dir: Path) -> list[RawDocument]:
    """Read the alt.atheism and sci.space posts of ``mini_newsgroup``."""
    bunch = load_newsgroups_bunch(data_dir / "mini_newsgroup")
    label_of_group = {"alt.atheism": "atheism", "sci.space": "space"}
    names = [str(n) for n in bunch["target_names"]]
    docs = []
    for i, (post, target) in enumerate(zip(bunch["data"], bunch["target"], strict=True)):
        group = names[int(target)]
        raw_name = bunch["filenames"][i] if "filenames" in bunch else str(i).encode()
        name = raw_name.decode("latin1") if isinstance(raw_name, bytes) else str(raw_name)
        doc_id = f"newsgroups/{group}/{name.rsplit('/', 1)[-1]}"
        docs.append(RawDocument(doc_id, label_of_group[group], "newsgroups", _clean_post(post)))
    return docs


def read_lee(data_dir: Path) -> list[RawDocument]:
    """Read the Lee news articles, one per non-empty line of each file."""
    docs = []
    for stem in ("lee_background", "lee"):
        lines = (data_dir / f"{stem}.cor").read_text(encoding="latin1").splitlines()
        articles = [line.strip() for line in lines if line.strip()]
        docs += [RawDocument(f"{stem}/{i:04d}", "news", stem, a) for i, a in enumerate(articles)]
    return docs


def read_pang_lee(data_dir: Path, *, sentences_per_doc: int) -> list[RawDocument]:
    """Group consecutive Pang & Lee sentences into pseudo-documents.

    The file lists the negative sentences, then the positive ones, so a group
    of consecutive sentences mixes polarities at most once.
    """
    text = (data_dir / "pang_lee_polarity.cor").read_text(encoding="latin1")
    sentences = [
        re.sub(r"^__label__\w+\s*", "", line).strip() for line in text.splitlines()
    ]
    sentences = [s for s in sentences if s]
    docs = []
    for start in range(0, len(sentences), sentences_per_doc):
        group = sentences[start : start + sentences_per_doc]
        doc_id = f"pang_lee/{start // sentences_per_doc:03d}"
        docs.append(RawDocument(doc_id, "movie", "pang_lee", "\n".join(group)))
    return docs


def read_wikipedia(data_dir: Path) -> list[RawDocument]:
    """Read the articles of the shortened English Wikipedia dump."""
    docs = []
    with bz2.open(data_dir / WIKI_DUMP, "rb") as stream:
        for _, elem in ET.iterparse(stream, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
            ns = fields["ns"].text if "ns" in fields else None
            revision = fields.get("revision")
            text_elem = None
            if revision is not None:
                text_elem = next(
                    (c for c in revision if c.tag.rsplit("}", 1)[-1] == "text"), None
                )
            if ns == "0" and "redirect" not in fields and text_elem is not None:
                page_id = fields["id"].text or ""
                body = strip_wiki_markup(text_elem.text or "")
                docs.append(RawDocument(f"enwiki/{page_id}", "wikipedia", "enwiki", body))
            elem.clear()
    return docs
