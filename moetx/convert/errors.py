"""The error every converter raises, the strict key and shape check that raises it, and its key
listings.

A conversion is strict: a source that does not hold exactly the target's keys and shapes fails
with a `ConversionError` that lists the unexpected, missing and wrong-shape keys (at most
`MAX_LISTED` of each spelled out), with hints and the fix. `check_keys` compares two
`{key: shape}` dicts and raises it. A Hugging Face conversion without transformers or safetensors
raises `MissingDependencyError`, one line naming `pip install 'moetx[hf]'`.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

# (regex over keys, hint): a hint is printed when any offending key matches its regex.
HintTable = Sequence[tuple[str, str]]

# At most this many keys per category are spelled out in a ConversionError message.
MAX_LISTED = 12


class ConversionError(ValueError):
    """A source tree or state dict does not match the target layout.

    Attributes:
      unexpected: source keys nothing maps to, with their shapes.
      missing: expected keys absent from the source, with their expected shapes.
      mismatched: keys present with the wrong shape, as (expected, found).
      conflicts: other problems by key, e.g. a tied copy that differs from its source.
    """

    def __init__(self, what: str, *, unexpected: Mapping[str, tuple] | None = None,
                 missing: Mapping[str, tuple] | None = None,
                 mismatched: Mapping[str, tuple[tuple, tuple]] | None = None,
                 conflicts: Mapping[str, str] | None = None, hints: Sequence[str] = (),
                 fix: str = ""):
        self.unexpected = dict(unexpected or {})
        self.missing = dict(missing or {})
        self.mismatched = dict(mismatched or {})
        self.conflicts = dict(conflicts or {})
        lines = [what]
        lines += listing("unexpected key(s) (in the source, nothing maps them)",
                         {k: shape_str(s) for k, s in self.unexpected.items()})
        lines += listing("missing key(s) (expected, not in the source)",
                         {k: f"expected {shape_str(s)}" for k, s in self.missing.items()})
        lines += listing("wrong shape(s)",
                         {k: f"expected {shape_str(e)}, found {shape_str(f)}"
                          for k, (e, f) in self.mismatched.items()})
        lines += listing("conflict(s)", self.conflicts)
        lines += [f"  hint: {h}" for h in dict.fromkeys(hints)]
        if fix:
            lines.append(f"  fix: {fix}")
        super().__init__("\n".join(lines))


class MissingDependencyError(ValueError):
    """A Hugging Face conversion without the `hf` extra installed (one line naming the fix)."""


HF_EXTRA_FIX = "pip install 'moetx[hf]'"


def missing_hf_extra(module: str, error: ImportError) -> MissingDependencyError:
    """The one-line error for a Hugging Face conversion whose `module` did not import."""
    return MissingDependencyError(
        f"Hugging Face conversion needs {module} (the `hf` extra: transformers and "
        f"safetensors), which did not import ({error}); install it with: {HF_EXTRA_FIX}")


def hints(keys: Iterable[str], table: HintTable) -> list[str]:
    """The hints of `table` whose regex matches (`re.search`) one of `keys`, in table order."""
    keys = list(keys)
    return [text for pattern, text in table if any(re.search(pattern, k) for k in keys)]


def check_keys(what: str, found: Mapping[str, tuple], expected: Mapping[str, tuple],
               hint_table: HintTable, fix: str, conflicts: Mapping[str, str] | None = None
               ) -> None:
    """Raises ConversionError unless `found` has exactly the keys and shapes of `expected`.

    Args:
      what: the message's first line (what was being converted and what went wrong).
      found, expected: {key: shape}.
      hint_table: hints for the offending keys (`hints`).
      fix: how to fix it, printed last.
      conflicts: other problems by key; any makes the check fail.
    """
    unexpected = {k: s for k, s in found.items() if k not in expected}
    missing = {k: s for k, s in expected.items() if k not in found}
    mismatched = {k: (expected[k], tuple(s)) for k, s in found.items()
                  if k in expected and tuple(s) != tuple(expected[k])}
    if unexpected or missing or mismatched or conflicts:
        keys = list(unexpected) + list(missing) + list(mismatched)
        raise ConversionError(what, unexpected=unexpected, missing=missing,
                              mismatched=mismatched, conflicts=conflicts,
                              hints=hints(keys, hint_table), fix=fix)


def shape_str(shape: Sequence[int]) -> str:
    """(4, 8) -> '[4, 8]'."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def listing(title: str, items: Mapping[str, str]) -> list[str]:
    """Message lines: a count and title, then up to MAX_LISTED sorted `key: text` lines."""
    if not items:
        return []
    keys = sorted(items)
    out = [f"  {len(keys)} {title}:"]
    out += [f"    {k}: {items[k]}" if items[k] else f"    {k}" for k in keys[:MAX_LISTED]]
    if len(keys) > MAX_LISTED:
        out.append(f"    ... and {len(keys) - MAX_LISTED} more")
    return out


__all__ = ["HF_EXTRA_FIX", "MAX_LISTED", "ConversionError", "HintTable", "MissingDependencyError",
           "check_keys", "hints", "listing", "missing_hf_extra", "shape_str"]
