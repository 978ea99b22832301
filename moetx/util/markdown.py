"""Generated sections of a Markdown file: text between a start and an end marker (HTML comments,
invisible when rendered) is replaced by a generator's output, and nothing else changes."""

from __future__ import annotations


def replace_between(text: str, start: str, end: str, body: str, name: str = "README") -> str:
    """`text` with everything between `start` and `end` replaced by `body` (on lines of its own).

    Raises ValueError naming `name` when a marker is missing, repeated, or the end comes first:
    a generator must never guess where its section goes.
    """
    for marker in (start, end):
        n = text.count(marker)
        if n != 1:
            raise ValueError(f"{name}: marker {marker!r} " + (
                "not found; add it around the generated section" if n == 0
                else f"found {n} times, expected once"))
    i, j = text.index(start) + len(start), text.index(end)
    if j < i:
        raise ValueError(f"{name}: {end!r} comes before {start!r}")
    return text[:i] + "\n" + body + "\n" + text[j:]
