"""Toy searches that train nothing: a check that the machinery works and the stub fitness its
tests use (they must live in the package so that worker processes can import them).

- `floatv_space()` / `ValueFitness`: PyGlove's own sanity search. The space is one float in
  [0, 1], the reward is the value itself, and `SmallStepMutator` moves it by at most 0.01
  (clipped to the range); regularized evolution must climb to reward 1.0.
- `ChoiceFitness`: a stub fitness over a dict of choices, with a two-stage budget (so hurdles
  apply) and injectable faults (an exception, a NaN reward, a worker that dies) keyed on the
  candidate, for testing what the search does with them.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Any

import gin
import pyglove as pg
from pyglove.ext import evolution as pg_evolution

from moetx.search.evolution import DONE, HURDLE, Outcome


@gin.configurable
def floatv_space(low: float = 0.0, high: float = 1.0):
    return pg.floatv(low, high)


@pg.members([("seed", pg.typing.Int().noneable()),
             ("step", pg.typing.Float(default=0.01))])
class SmallStepMutator(pg_evolution.Mutator):
    """Moves a one-float DNA by a uniform amount in [-step, step], clipped to [0, 1]."""

    def _on_bound(self):
        super()._on_bound()
        self._random = random.Random(self.seed)

    def mutate(self, dna, step=0):
        del step
        value = dna.value + self._random.uniform(-self.step, self.step)
        return pg.DNA(min(1.0, max(0.0, value)))


@gin.configurable
def pyglove_choice_space():
    """Three small choices (4 x 3 x 2 candidates), the stub fitness's space."""
    return pg.Dict(a=pg.oneof([0, 1, 2, 3]), b=pg.oneof([0, 1, 2]), c=pg.oneof([0, 5]))


@gin.configurable
def small_step_mutator(seed: int | None = None, step: float = 0.01) -> SmallStepMutator:
    return SmallStepMutator(seed=seed, step=step)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ValueFitness:
    """reward = the candidate (a float)."""

    def __call__(self, candidate: Any, trial_dir: str, hurdle: float | None) -> Outcome:
        del trial_dir, hurdle
        return Outcome(float(candidate), cost={"steps": 1})


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ChoiceFitness:
    """A stub for a two-stage trial on a `pg.Dict` of numbers: the early reward is
    `early_scale * sum(values)`, the full one `sum(values)`; a candidate whose early reward is
    below `hurdle` stops early. `raise_on`, `nan_on` and `die_on` name a key whose value, when
    equal to the given one, makes the trial raise, return NaN, or kill its process."""

    early_scale: float = 0.5
    raise_on: tuple = ()
    nan_on: tuple = ()
    die_on: tuple = ()
    marker_dir: str | None = None
    delay: float = 0.0

    def __call__(self, candidate: Any, trial_dir: str, hurdle: float | None) -> Outcome:
        values = dict(candidate)
        if self.marker_dir:  # lets tests count how often each trial really ran
            with open(os.path.join(self.marker_dir, os.path.basename(trial_dir)), "a") as f:
                f.write("ran\n")
        if self.raise_on and values.get(self.raise_on[0]) == self.raise_on[1]:
            raise RuntimeError(f"injected failure for {self.raise_on[0]}={self.raise_on[1]}")
        if self.die_on and values.get(self.die_on[0]) == self.die_on[1]:
            os._exit(9)  # as the kernel's OOM killer would end it
        if self.delay:
            time.sleep(self.delay)
        total = float(sum(float(v) for v in values.values()))
        if self.nan_on and values.get(self.nan_on[0]) == self.nan_on[1]:
            total = float("nan")
        early = self.early_scale * total
        if hurdle is not None and early < hurdle:
            return Outcome(early, HURDLE, reason=f"early reward {early:.4g} < hurdle "
                                                 f"{hurdle:.4g}", hurdle_reward=early,
                           cost={"steps": 1})
        return Outcome(total, DONE, hurdle_reward=early, cost={"steps": 2})
