"""Plain-text cleaning for the bundled corpus: Gutenberg texts, plays and Wikipedia wikitext.

Every function returns paragraphs: single-line strings with normalised whitespace, at most
`MAX_PARAGRAPH_CHARS` long (longer blocks are split at sentence ends).
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator

MIN_PARAGRAPH_CHARS = 40
MAX_PARAGRAPH_CHARS = 2000
#: Short blocks of a play (a line of dialogue) are merged until a paragraph reaches this size.
PLAY_PARAGRAPH_TARGET_CHARS = 1000


def normalize(text: str) -> str:
    """Collapses every run of whitespace (newlines included) into one space."""
    return " ".join(text.split())


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[;:,])\s+")


def _pack(pieces: list[str], max_chars: int) -> list[str]:
    out: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 1 + len(piece) > max_chars:
            out.append(current)
            current = piece
        else:
            current = f"{current} {piece}" if current else piece
    if current:
        out.append(current)
    return out


def cap_length(text: str, max_chars: int = MAX_PARAGRAPH_CHARS) -> list[str]:
    """Splits a normalised paragraph into pieces of at most `max_chars`.

    Cuts at sentence ends first, then at clause punctuation, then at spaces, so that pieces
    stay readable prose.
    """
    if len(text) <= max_chars:
        return [text] if text else []
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        if len(sentence) <= max_chars:
            pieces.append(sentence)
            continue
        for clause in _CLAUSE_END.split(sentence):
            if len(clause) <= max_chars:
                pieces.append(clause)
            else:
                pieces.extend(_pack(clause.split(" "), max_chars))
    return [p for p in _pack([p.strip() for p in pieces if p.strip()], max_chars) if p]


# ----------------------------------------------------------------------------- Gutenberg, plays

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.M | re.I,
)
_GUTENBERG_LINE = re.compile(r"gutenberg|electronic version|etext", re.I)


def strip_gutenberg(text: str) -> str:
    """Removes the Project Gutenberg license header and footer, if present.

    Keeps what lies between the `*** START OF ...` and `*** END OF ...` markers; without
    markers, drops any stray line that mentions Project Gutenberg or e-texts.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return "\n".join(line for line in text.splitlines() if not _GUTENBERG_LINE.search(line))


_PLAY_HEADING = re.compile(
    r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction)\b"
)
_ROMAN = re.compile(r"^[IVXLC]+\.?$")


def play_paragraphs(text: str) -> list[str]:
    """Turns a play or poem (blank-line separated blocks) into paragraphs.

    A block is usually one speech (speaker line, then verse), too short on its own, so blocks
    are merged until a paragraph reaches ~1000 characters; act/scene headings start a new
    paragraph, and bare roman numerals (sonnet numbers) are dropped.
    """
    out: list[str] = []
    current: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            out.extend(cap_length(normalize(" ".join(current))))
        current, size = [], 0

    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if _ROMAN.match(lines[0]):
            flush()
            lines = lines[1:]
        elif _PLAY_HEADING.match(lines[0]):
            flush()
        if not lines:
            continue
        block_text = normalize(" ".join(lines))
        current.append(block_text)
        size += len(block_text) + 1
        if size >= PLAY_PARAGRAPH_TARGET_CHARS:
            flush()
    flush()
    return [p for p in out if len(p) >= MIN_PARAGRAPH_CHARS]


# ----------------------------------------------------------------------------------- Wikipedia


def iter_wiki_articles(xml_bytes: bytes) -> Iterator[tuple[str, str]]:
    """Yields (title, wikitext) of every main-namespace, non-redirect page of a MediaWiki dump."""
    for _, elem in ET.iterparse(_BytesReader(xml_bytes), events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
        revision = fields.get("revision")
        text_elem = None
        if revision is not None:
            text_elem = next((c for c in revision if c.tag.endswith("}text")), None)
        is_article = fields.get("ns") is not None and (fields["ns"].text or "").strip() == "0"
        if is_article and "redirect" not in fields and text_elem is not None and text_elem.text:
            yield (fields["title"].text or ""), text_elem.text
        elem.clear()


class _BytesReader:
    """Minimal file-like wrapper so iterparse reads from memory without a copy per chunk."""

    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n is None or n < 0 else min(len(self._data), self._pos + n)
        chunk = self._data[self._pos : end].tobytes()
        self._pos = end
        return chunk


def _remove_nested(text: str, open_: str, close: str) -> str:
    """Removes balanced `open_ ... close` regions, nesting included (templates, tables).

    An opener that is never closed is kept as literal text (the paragraph filter drops it
    later) rather than swallowing the rest of the article.
    """
    token = re.compile(f"{re.escape(open_)}|{re.escape(close)}")
    out: list[str] = []
    depth = 0
    pos = 0
    start = 0
    for m in token.finditer(text):
        if m.group() == open_:
            if depth == 0:
                out.append(text[pos : m.start()])
                start = m.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                pos = m.end()
    out.append(text[start:] if depth > 0 else text[pos:])
    return "".join(out)


_DROP_LINK_PREFIX = re.compile(
    r"^:?\s*(file|image|media|category|wikt|wiktionary|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I
)


def _replace_links(text: str) -> str:
    """`[[target|label]]` → label, `[[target]]` → target; file/category/interwiki links dropped."""
    token = re.compile(r"\[\[|\]\]")
    out: list[str] = []
    depth = 0
    pos = 0
    start = 0
    for m in token.finditer(text):
        if m.group() == "[[":
            if depth == 0:
                out.append(text[pos : m.start()])
                start = m.end()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                inner = text[start : m.start()]
                pos = m.end()
                if _DROP_LINK_PREFIX.match(inner):
                    continue
                parts = _replace_links(inner).split("|")
                label = parts[-1].strip() or parts[0].strip()
                # The "pipe trick" [[Foo (bar)|]] shows "Foo".
                out.append(re.sub(r"\s*\(.*\)$", "", label) if not parts[-1].strip() else label)
    out.append(text[start - 2 :] if depth > 0 else text[pos:])
    return "".join(out)


_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_REF = re.compile(r"<ref(\s[^>]*?)?/\s*>|<ref(\s[^>]*)?>.*?</ref\s*>", re.S | re.I)
_DROP_TAG_BLOCKS = re.compile(
    r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source|pre|chem|hiero|graph"
    r"|references|mapframe|table)\b[^>]*>.*?</\1\s*>",
    re.S | re.I,
)
_BR = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*\s*([^\]]*)\]")
_QUOTES = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_SKIP_SECTIONS = {
    "see also",
    "references",
    "notes",
    "external links",
    "further reading",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
    "works cited",
    "gallery",
    "references and notes",
    "primary sources",
    "secondary sources",
    "works",
    "discography",
    "filmography",
    "publications",
    "selected works",
}
_LEFTOVER = ("{{", "}}", "[[", "]]", "{|", "|}", "''", "<ref", "</", "/>", "|", "http")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_SPACE_AFTER_PAREN = re.compile(r"\(\s+")


def wikitext_paragraphs(wikitext: str) -> list[str]:
    """Converts one article's wikitext into plain prose paragraphs.

    Drops templates (nested), tables, references, comments, math/galleries, file/category and
    interwiki links, lists, headings and the trailing reference-like sections; keeps link labels
    and the text of inline html. Paragraphs that still contain markup, are shorter than
    `MIN_PARAGRAPH_CHARS` or do not end like a sentence are dropped.
    """
    text = _COMMENT.sub("", wikitext)
    text = _REF.sub("", text)
    text = _DROP_TAG_BLOCKS.sub("", text)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_nested(text, "{|", "|}")
    text = _replace_links(text)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _BR.sub(" ", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)

    paragraphs: list[str] = []
    current: list[str] = []
    skipping = False

    def flush() -> None:
        if current and not skipping:
            paragraphs.append(" ".join(current))
        current.clear()

    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            flush()
            title = normalize(_TAG.sub("", heading.group(2))).lower()
            if len(heading.group(1)) == 2:  # only a top-level section switches skipping
                skipping = title in _SKIP_SECTIONS
            elif title in _SKIP_SECTIONS:
                skipping = True
            continue
        if not line or line[0] in "*#;|!{}":
            flush()
            continue
        current.append(line.lstrip(":").strip())
    flush()

    out: list[str] = []
    for para in paragraphs:
        para = _TAG.sub("", html.unescape(para))
        para = _SPACE_BEFORE_PUNCT.sub(r"\1", _EMPTY_PARENS.sub("", normalize(para)))
        para = _SPACE_AFTER_PAREN.sub("(", para)
        para = normalize(para)
        if len(para) < MIN_PARAGRAPH_CHARS or any(m in para for m in _LEFTOVER):
            continue
        if para[-1] not in ".!?\"')":
            continue
        out.extend(cap_length(para))
    return out
