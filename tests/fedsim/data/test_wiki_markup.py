"""Rough MediaWiki-to-text conversion on hand-written markup."""

from __future__ import annotations

from fedsim.data.wiki_markup import strip_wiki_markup


def test_strip_keeps_link_text_and_prose_when_markup_is_nested():
    # Prepare
    wikitext = (
        "{{Infobox person|name={{nowrap|Ada}}}}\n"
        "'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref>{{cite book|t=x}}</ref>\n"
        "[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace|Ada]]]]\n"
        "== Life ==\n"
        "* She worked with [[Charles Babbage]] on the [http://example.org Analytical Engine].\n"
        "{| class=\"wikitable\"\n|-\n| cell || cell\n|}\n"
        "Born in 1815&nbsp;in London.<!-- hidden -->\n"
        "== References ==\n"
        "* A citation that must go.\n"
        "[[Category:Mathematicians]]\n"
    )

    # Execute
    text = strip_wiki_markup(wikitext)

    # Assert
    assert text.splitlines() == [
        "Ada Lovelace was an English mathematician.",
        "Life",
        "She worked with Charles Babbage on the Analytical Engine.",
        "Born in 1815\xa0in London.",
    ]


def test_strip_drops_interlanguage_and_category_links():
    assert strip_wiki_markup("Text [[de:Text]] [[Category:X]] end") == "Text   end"
