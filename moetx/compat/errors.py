"""The one-line refusal of the T5X compatibility layer, and its warning line."""

from __future__ import annotations

import sys


class CompatError(ValueError):
    """A T5X / flaxformer setting moetx cannot honour, refused in one line that names the
    moetx equivalent (the commands print it as `moetx: error: ...`)."""


def refuse(what: str, fix: str) -> CompatError:
    """`CompatError('<what> is not supported by moetx; <fix>.')` (returned, to `raise`)."""
    return CompatError(f"{what} is not supported by moetx; {fix}.")


def warn(msg: str) -> None:
    """Prints `moetx: warning: <msg>` on stderr."""
    print(f"moetx: warning: {msg}", file=sys.stderr, flush=True)
