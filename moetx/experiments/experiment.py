"""An experiment's definition and its matched budgets.

An experiment is a set of named arms trained for each of its seeds. An arm is its own model gin
files (a dense decoder, a Switch decoder and a Primer decoder can be arms of one experiment) and
bindings; the experiment adds the run gin files and bindings every arm shares. The budget is in
training FLOPs: each arm trains floor(budget / its own FLOPs per step) steps, where the FLOPs per
step are the model's own `flops_per_step` (6 x active matmul parameters per token plus
attention: an MoE counts the k of its E experts a token meets, a Primer decoder its depthwise
convolutions), so every arm's compute is within one step of the budget.

An arm may start from another arm's final checkpoint of the same seed (`start_from`): the run
is initialised from it (`InitFromCheckpoint` with `continue_step`, so it goes on from that step,
with the source's optimizer state when the parameters map one to one) and trains its own budget
on top. With `InitFromCheckpoint.upcycle = True` among the arm's bindings, a dense run is
upcycled into the arm's MoE model (sparse upcycling). Arms run in the order given, so the arm
started from must come earlier.

    experiment.arms = {
        'dense': {'gin_files': ['models/decoder_tiny.gin']},
        'switch8': {'gin_files': ['models/decoder_tiny.gin', 'models/moe_common.gin'],
                    'bindings': ['MoeConfig.num_experts = 8', ...]},
    }
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import gin

from moetx.search import compare, fitness as fitness_lib


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of an experiment.

    Attributes:
      gin_files: the arm's model gin files, parsed before the experiment's run gin files.
      bindings: the arm's gin bindings, parsed after the experiment's shared bindings.
      budget: the arm's own training-FLOPs budget (None: the experiment's).
      start_from: the name of an earlier arm whose final checkpoint (same seed) this arm's runs
        start from, at its step; the budget is then the FLOPs trained on top of it.
    """

    gin_files: Sequence[str] = ()
    bindings: Sequence[str] = ()
    budget: float | None = None
    start_from: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "gin_files", tuple(self.gin_files))
        object.__setattr__(self, "bindings", tuple(self.bindings))
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"An arm's budget must be a positive number of FLOPs, got "
                             f"{self.budget!r}.")


_ARM_KEYS = {f.name for f in dataclasses.fields(Arm)}


def as_arm(name: str, spec: Arm | Mapping[str, Any]) -> Arm:
    """An `Arm` from an Arm or a mapping of its fields (what a gin dict literal gives)."""
    if isinstance(spec, Arm):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"Arm {name!r}: expected a mapping with keys among {sorted(_ARM_KEYS)}, "
                         f"got {type(spec).__name__}.")
    unknown = set(spec) - _ARM_KEYS
    if unknown:
        raise ValueError(f"Arm {name!r}: unknown keys {sorted(unknown)}; an arm has "
                         f"{sorted(_ARM_KEYS)}.")
    return Arm(**spec)


@gin.configurable("experiment")
@dataclasses.dataclass(frozen=True)
class Experiment:
    """What to train and how to compare it (see the module docstring).

    Attributes:
      name: the experiment's name (in the outputs' titles).
      output_dir: where the runs (`<arm>/seed_<s>`), curves, summary and plots go.
      arms: arm name -> `Arm` (or a mapping of its fields), in run order.
      gin_files: the run gin files every arm shares (e.g. `runs/pretrain.gin` and a data and
        size setup), parsed after each arm's model gin files.
      bindings: gin bindings every arm shares.
      macros: gin macros every run defines, name -> value (a Python literal). The experiment's
        gin file is parsed once and each run's configuration afresh, so this is how a macro of
        the experiment file reaches the runs: `experiment.macros = {'LR': %LR}` with an arm
        binding `'rsqrt_schedule.base_learning_rate = %LR'`, and `--gin.LR=...` changes it.
      budget: training FLOPs of each run.
      seeds: values of the SEED macro (initialisation and data order).
      baseline: the arm the speed-ups are measured against (default the first arm).
      evals_per_run: evaluations per run: every ceil(steps / evals_per_run) steps and at the
        end (checkpoints are saved as often, so a killed run loses at most that much).
      spike_factor, spike_window: a logged training loss above `spike_factor` times the mean
        of the `spike_window` logged losses before it counts as a loss spike (the rule of
        `moetx.trainer.divergence.Monitor`, applied to the run's logged losses afterwards;
        the runs themselves keep their own divergence policy).
      keep_checkpoints: keep every run's checkpoints; otherwise a finished run's are deleted
        unless another arm starts from them.
      compilation_cache: share compiled programs between runs through JAX's persistent cache
        in `output_dir/jax_cache` (seeds of an arm compile once).
    """

    name: str = ""
    output_dir: str = ""
    arms: Mapping[str, Arm | Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    gin_files: Sequence[str] = ()
    bindings: Sequence[str] = ()
    macros: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    budget: float | None = None
    seeds: Sequence[int] = (0, 1, 2)
    baseline: str | None = None
    evals_per_run: int = 6
    spike_factor: float = 1.5
    spike_window: int = 10
    keep_checkpoints: bool = False
    compilation_cache: bool = True

    def __post_init__(self):
        for attr in ("name", "output_dir"):
            if not getattr(self, attr):
                raise ValueError(f"experiment.{attr} is required.")
        if not self.arms:
            raise ValueError("experiment.arms is empty: an experiment needs at least one arm.")
        arms = {name: as_arm(name, spec) for name, spec in self.arms.items()}
        object.__setattr__(self, "arms", arms)
        object.__setattr__(self, "gin_files", tuple(self.gin_files))
        object.__setattr__(self, "bindings", tuple(self.bindings))
        object.__setattr__(self, "macros", dict(self.macros))
        for macro in self.macros:
            if not str(macro).isidentifier():
                raise ValueError(f"experiment.macros: {macro!r} is not a macro name.")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"experiment.seeds must be distinct and not empty, got {self.seeds}.")
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"experiment.budget must be a positive number of training FLOPs, "
                             f"got {self.budget!r}.")
        for name, arm in arms.items():
            if arm.budget is None and self.budget is None:
                raise ValueError(f"Arm {name!r} has no budget: set experiment.budget (or the "
                                 f"arm's own).")
            if arm.start_from is not None:
                earlier = list(arms)[:list(arms).index(name)]
                if arm.start_from not in earlier:
                    raise ValueError(f"Arm {name!r} starts from {arm.start_from!r}, which is not "
                                     f"an arm listed before it ({earlier}).")
        if self.baseline is not None and self.baseline not in arms:
            raise ValueError(f"experiment.baseline {self.baseline!r} is not an arm "
                             f"({list(arms)}).")
        if self.evals_per_run < 1 or self.spike_window < 1 or not self.spike_factor > 1:
            raise ValueError("experiment.evals_per_run and spike_window must be >= 1 and "
                             "spike_factor > 1.")

    @property
    def shared_bindings(self) -> tuple[str, ...]:
        """The macros, then the bindings, every run parses after its gin files."""
        return (*(f"{k} = {v!r}" for k, v in self.macros.items()), *self.bindings)

    @property
    def baseline_arm(self) -> str:
        return self.baseline or next(iter(self.arms))

    def run_dir(self, arm: str, seed: int) -> str:
        return os.path.join(self.output_dir, arm, f"seed_{seed}")


@dataclasses.dataclass(frozen=True)
class ArmPlan:
    """An arm's matched budget: it trains `steps` steps of `flops_per_step` FLOPs from step
    `start_step` (0, or where the arm it starts from ended), evaluating every `eval_every`."""

    name: str
    arm: Arm
    fitness: fitness_lib.TrainingFitness
    budget: float
    flops_per_step: float
    steps: int
    start_step: int
    eval_every: int

    @property
    def flops(self) -> float:
        return self.steps * self.flops_per_step

    @property
    def deviation(self) -> float:
        """(steps x FLOPs per step - budget) / budget: within (-1 step, 0]."""
        return self.flops / self.budget - 1.0

    @property
    def last_step(self) -> int:
        return self.start_step + self.steps


def run_bindings(exp: Experiment, plan: ArmPlan, seed: int) -> list[str]:
    """The bindings of one run on top of the shared ones: the start-from checkpoint, the arm's
    bindings, the seed and the evaluation / checkpoint interval."""
    out = []
    if plan.arm.start_from is not None:
        source = exp.run_dir(plan.arm.start_from, seed)
        out += ["import moetx.convert.restore", "train.init_from = @InitFromCheckpoint()",
                f"InitFromCheckpoint.path = {source!r}", "InitFromCheckpoint.continue_step = True"]
    return out + [*plan.arm.bindings, f"SEED = {int(seed)}", f"EVAL_EVERY = {plan.eval_every}",
                  f"SAVE_EVERY = {plan.eval_every}"]


def plan(exp: Experiment) -> dict[str, ArmPlan]:
    """Every arm's matched budget, from the FLOPs per step of the model its gin files and
    bindings build (shapes only: nothing is initialised or compiled)."""
    plans: dict[str, ArmPlan] = {}
    for name, arm in exp.arms.items():
        budget = arm.budget if arm.budget is not None else exp.budget
        fitness = fitness_lib.TrainingFitness(
            gin_files=(*arm.gin_files, *exp.gin_files), bindings=exp.shared_bindings,
            train_flops=budget, compilation_cache=False)
        start = 0
        if arm.start_from is not None:
            start = plans[arm.start_from].last_step
        probe = ArmPlan(name, arm, fitness, budget, 0.0, 1, start, 1)
        fitness.parse(run_bindings(exp, probe, exp.seeds[0]), exp.run_dir(name, exp.seeds[0]),
                      start + 1)
        fps = fitness.planned_flops_per_step()
        steps = compare.matched_steps(fps, train_flops=budget, arm=name)
        every = -(-steps // exp.evals_per_run)
        plans[name] = ArmPlan(name, arm, fitness, budget, fps, steps, start, every)
    return plans


def format_plan(exp: Experiment, plans: Mapping[str, ArmPlan]) -> str:
    """The matched budgets as a table: arm, FLOPs per step, steps, their product and its
    deviation from the arm's budget."""
    width = max(len("arm"), *(len(n) for n in plans))
    lines = [f"[experiment] {exp.name}: {len(plans)} arms x {len(exp.seeds)} seeds "
             f"{tuple(exp.seeds)}, baseline {exp.baseline_arm!r}",
             f"  {'arm':<{width}}  {'budget':>9}  {'FLOPs/step':>10}  {'steps':>7}  "
             f"{'steps x FLOPs/step':>18}  {'deviation':>9}  start"]
    for name, p in plans.items():
        start = f"step {p.start_step} of {p.arm.start_from}" if p.arm.start_from else "-"
        lines.append(f"  {name:<{width}}  {p.budget:>9.3e}  {p.flops_per_step:>10.3e}  "
                     f"{p.steps:>7d}  {p.flops:>18.4e}  {100 * p.deviation:>8.3f}%  {start}")
    loose = [name for name, p in plans.items() if p.deviation < -0.01]
    if loose:
        lines.append(f"  note: {', '.join(loose)} fall(s) more than 1% short of the budget (with "
                     f"under 100 steps, one step is over 1% of it): raise the budget to match "
                     f"closer.")
    return "\n".join(lines)
