"""Turn MediaWiki markup into plain prose, roughly, with regular expressions.

Good enough for a topic-classification corpus: templates, tables, references,
file and category links, HTML and emphasis marks go; link text stays; the
trailing reference sections (References, See also, External links, ...) are
cut, since they are lists of citations rather than prose. This is not a
MediaWiki parser: a few fragments of broken markup may survive, which the
word normaliser downstream reduces to stray punctuation.
"""

from __future__ import annotations

import html
import re

_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_BARE_URL = re.compile(r"(?:https?|ftp)://\S+")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_TAIL_SECTION = re.compile(
    r"^=+\s*(?:references|see also|external links|notes|further reading|"
    r"bibliography|sources|footnotes|citations)\s*=+\s*$",
    re.MULTILINE | re.IGNORECASE,
)
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_TABLE_LINE = re.compile(r"^\s*[|!{}].*$", re.MULTILINE)
_NON_ARTICLE_LINK = re.compile(
    r"^\s*:?\s*(?:file|image|category|media|wikipedia|wp|help|template|portal|"
    r"[a-z]{2,3}(?:-[a-z]+)?)\s*:",
    re.IGNORECASE,
)


def _repeat_sub(pattern: re.Pattern[str], repl: str, text: str) -> str:
    """Apply ``pattern`` until nothing changes, so nested constructs go inside out."""
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def _link_text(match: re.Match[str]) -> str:
    """Replace a link by its visible text (file, category, interlanguage links: nothing).

    ``[[target|label]]`` -> label, ``[[target]]`` -> target.
    """
    inner = match.group(1)
    if _NON_ARTICLE_LINK.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1]


def strip_wiki_markup(text: str) -> str:
    """Return the prose of one article's wikitext.

    Parameters
    ----------
    text : str
        The ``<text>`` of a page as found in a ``pages-articles`` XML dump
        (XML entities already decoded by the XML parser).

    Returns
    -------
    str
        Plain text with paragraphs separated by newlines.
    """
    tail = _TAIL_SECTION.search(text)
    if tail is not None:
        text = text[: tail.start()]
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _repeat_sub(_INNER_TEMPLATE, "", text)
    text = _repeat_sub(_INNER_TABLE, "", text)
    while True:
        text, n = _INNER_LINK.subn(_link_text, text)
        if n == 0:
            break
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _BARE_URL.sub("", text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    text = _TAG.sub("", text)  # tags that were escaped twice in the dump
    text = _EMPHASIS.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _TABLE_LINE.sub("", text)
    text = _LIST_MARK.sub("", text)
    return re.sub(r"\n{2,}", "\n", text).strip()
