"""Search spaces over gin bindings: any configurable moetx object (a `TransformerConfig`, a
`MoeConfig`, an optimizer's settings) becomes searchable without code.

`gin_space({'TransformerConfig.mlp_dim': [64, 128], 'MoeConfig.num_experts': [4, 8],
'rsqrt_schedule.base_learning_rate': (0.1, 2.0)})` is a `GinBindings` candidate whose values are
PyGlove hyper values: a list is `pg.oneof` over its items, a `(low, high)` pair of floats is
`pg.floatv(low, high)`, and a hyper value is used as given. A materialised candidate is an
ordinary set of gin bindings (`gin_bindings()`), so its trial is the same run a user would start
with `--gin.TransformerConfig.mlp_dim=128 ...`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import gin
import pyglove as pg


@pg.members([
    ("values", pg.typing.Dict([(pg.typing.StrKey(), pg.typing.Any())]),
     "gin binding name -> value (a hyper value in the space)."),
    ("imports", pg.typing.List(pg.typing.Str(), default=[]),
     "modules the bindings need imported."),
])
class GinBindings(pg.Object):
    """A candidate that is a set of gin bindings."""

    def gin_bindings(self) -> list[str]:
        return [f"import {m}" for m in self.imports] + [
            f"{name} = {_gin_literal(value)}" for name, value in sorted(self.values.items())]

    def validate(self) -> None:
        for name, value in self.values.items():
            _gin_literal(value)
            if "." not in name and "/" not in name and not name.isupper():
                raise ValueError(f"{name!r} is neither a configurable's parameter nor a macro.")

    def fingerprint(self) -> str:
        """Equal bindings are the same run (no probe can tell configurations apart cheaper)."""
        return hashlib.sha1(json.dumps(self.gin_bindings()).encode()).hexdigest()

    def text(self) -> str:
        return "; ".join(f"{n}={_gin_literal(v)}" for n, v in sorted(self.values.items()))


def _gin_literal(value: Any) -> str:
    if isinstance(value, (bool, int, float, str, type(None))):
        return repr(value)
    if isinstance(value, (list, tuple)):
        items = ", ".join(_gin_literal(v) for v in value)
        return f"({items},)" if isinstance(value, tuple) and len(value) == 1 else (
            f"({items})" if isinstance(value, tuple) else f"[{items}]")
    raise ValueError(f"{value!r} cannot be written as a gin literal.")


@gin.configurable
def gin_space(choices: Mapping[str, Any] = gin.REQUIRED, imports=()) -> GinBindings:
    """A `GinBindings` search space from `choices` (see the module docstring)."""
    if not choices:
        raise ValueError("gin_space needs at least one binding to search over.")
    values = {}
    for name, spec in choices.items():
        if isinstance(spec, pg.hyper.HyperValue):
            values[name] = spec
        elif isinstance(spec, list):
            if not spec:
                raise ValueError(f"{name}: an empty list of choices.")
            values[name] = pg.oneof(spec) if len(spec) > 1 else spec[0]
        elif isinstance(spec, tuple) and len(spec) == 2 and all(
                isinstance(v, float) for v in spec):
            values[name] = pg.floatv(*spec)
        else:
            raise ValueError(f"{name}: give a list of choices, a (low, high) float pair or a "
                             f"PyGlove hyper value, got {spec!r}.")
    return GinBindings(values=values, imports=list(imports))
