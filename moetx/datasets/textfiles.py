"""Users' own text files (one example per line), read with a bound on every line.

A line is read at most `max_line_bytes` at a time, so a file without newlines (a binary file, a
minified dump) costs neither unbounded memory nor unbounded tokenisation time: a longer line
keeps its first `max_line_bytes` (cut at a character boundary) and the rest is skipped. Bytes
that are not UTF-8 are decoded to U+FFFD instead of reaching the tokenizer as they are.

`scan` counts what reading would meet (lines, over-long lines, lines that are not UTF-8) so
that a task over such files can say so once, with the counts, before training starts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

#: Default bound on the bytes of one line (1 MiB).
MAX_LINE_BYTES = 1 << 20
#: `scan` reads at most this many bytes of each file; the counts are then of that prefix.
SCAN_BYTES = 32 << 20
#: A file whose undecodable share of bytes is above this looks like binary data.
MOSTLY_UNDECODABLE = 0.5
_SKIP_CHUNK = 1 << 20


@dataclasses.dataclass
class TextFileStats:
    """What `scan` found in one file (or, added up, in several).

    Attributes:
      lines: lines read (blank ones included).
      bytes: bytes read.
      bad_lines: lines that are not valid UTF-8.
      bad_bytes: bytes of those lines.
      long_lines: lines longer than `max_line_bytes` (cut to it when read).
      text_lines: lines that are valid UTF-8 and not blank.
      scanned_all: False when the scan stopped after `SCAN_BYTES` of a file.
    """

    lines: int = 0
    bytes: int = 0
    bad_lines: int = 0
    bad_bytes: int = 0
    long_lines: int = 0
    text_lines: int = 0
    scanned_all: bool = True

    def __add__(self, other: TextFileStats) -> TextFileStats:
        return TextFileStats(self.lines + other.lines, self.bytes + other.bytes,
                             self.bad_lines + other.bad_lines, self.bad_bytes + other.bad_bytes,
                             self.long_lines + other.long_lines,
                             self.text_lines + other.text_lines,
                             self.scanned_all and other.scanned_all)

    @property
    def bad_share(self) -> float:
        """The share of the bytes read that lie on lines that are not UTF-8."""
        return self.bad_bytes / self.bytes if self.bytes else 0.0


def check_max_line_bytes(max_line_bytes: int) -> None:
    """Raises ValueError unless `max_line_bytes` is a positive int."""
    if isinstance(max_line_bytes, bool) or not isinstance(max_line_bytes, int) \
            or max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be a positive int (bytes of one line), got "
                         f"{max_line_bytes!r}.")


def _raw_lines(f, max_line_bytes: int) -> Iterator[tuple[bytes, int, bool]]:
    """(line without its newline and at most `max_line_bytes` long, the line's size in bytes,
    whether it was cut) for each line of binary file `f`."""
    while True:
        piece = f.readline(max_line_bytes + 1)
        if not piece:
            return
        size = len(piece)
        if piece.endswith(b"\n") or size <= max_line_bytes:
            line = piece[:-1] if piece.endswith(b"\n") else piece
            yield (line[:-1] if line.endswith(b"\r") else line), size, False
            continue
        head = _cut_at_char(piece, max_line_bytes)
        while not piece.endswith(b"\n"):
            piece = f.readline(_SKIP_CHUNK)
            if not piece:
                break
            size += len(piece)
        yield head, size, True


def _cut_at_char(data: bytes, limit: int) -> bytes:
    """The first `limit` bytes of `data` (which is longer), less the start of a UTF-8
    character the cut would split."""
    cut = limit
    while cut > max(limit - 3, 0) and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return data[:cut] if (data[cut] & 0xC0) != 0x80 else data[:limit]


def read_lines(path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES
               ) -> Iterator[bytes]:
    """The lines of `path` as UTF-8 bytes: without newlines, at most `max_line_bytes` read of
    each (longer lines are cut), bytes that are not UTF-8 replaced by U+FFFD."""
    check_max_line_bytes(max_line_bytes)
    with open(path, "rb") as f:
        for line, _, _ in _raw_lines(f, max_line_bytes):
            yield line if _is_utf8(line) else line.decode("utf-8", "replace").encode("utf-8")


def scan(path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES,
         scan_bytes: int = SCAN_BYTES) -> TextFileStats:
    """Counts the lines of `path`, those longer than `max_line_bytes` and those that are not
    UTF-8 (reading at most about `scan_bytes`; `scanned_all` says whether that was all)."""
    check_max_line_bytes(max_line_bytes)
    stats = TextFileStats()
    with open(path, "rb") as f:
        for line, size, cut in _raw_lines(f, max_line_bytes):
            stats.lines += 1
            stats.bytes += size
            stats.long_lines += cut
            if not _is_utf8(line):
                stats.bad_lines += 1
                stats.bad_bytes += size
            elif line.strip():
                stats.text_lines += 1
            if stats.bytes >= scan_bytes:
                stats.scanned_all = f.read(1) == b""
                break
    return stats


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def scan_files(paths: Sequence[str | os.PathLike], max_line_bytes: int = MAX_LINE_BYTES,
               scan_bytes: int = SCAN_BYTES) -> TextFileStats:
    """`scan` of every file, added up."""
    total = TextFileStats()
    for path in paths:
        total = total + scan(path, max_line_bytes, scan_bytes)
    return total


def describe(stats: TextFileStats, max_line_bytes: int) -> str | None:
    """One sentence on what is wrong with text of these `stats`, or None when nothing is."""
    parts = []
    if stats.bad_lines:
        parts.append(f"{stats.bad_lines:,} of {stats.lines:,} lines ({stats.bad_share:.1%} of "
                     f"the bytes) are not valid UTF-8 and are read with U+FFFD replacements")
        if stats.bad_share > MOSTLY_UNDECODABLE:
            parts[-1] += " (mostly undecodable: is this binary data?)"
    if stats.long_lines:
        parts.append(f"{stats.long_lines:,} line{'s' if stats.long_lines > 1 else ''} longer "
                     f"than max_line_bytes={max_line_bytes:,} "
                     f"{'are' if stats.long_lines > 1 else 'is'} cut to that length")
    if not parts:
        return None
    where = "" if stats.scanned_all else f" (in the first {SCAN_BYTES >> 20} MiB of each file)"
    return "; ".join(parts) + where
