"""Fitness by training: a trial is an ordinary moetx training run (`moetx.trainer.train.train`,
called as a library in the worker process) of a gin configuration plus the candidate's bindings.

`TrainingFitness` parses the base gin files and bindings, adds the candidate's `gin_bindings()`,
`MODEL_DIR` (the trial directory) and `TRAIN_STEPS`, and trains. The budget is fixed in training
steps, or in training FLOPs (`train_flops`: the steps are the budget divided by the model's own
FLOPs per step, so a bigger candidate trains fewer steps and candidates compare at equal
compute). The reward is minus the final validation metric (`metric`, default the loss).

With hurdles (`hurdle_fraction`), the run first trains that fraction of its steps and evaluates;
below the search's hurdle it stops there (status `hurdle`), otherwise the second call of
`train()` resumes from the first one's checkpoint and trains to the full budget, so a candidate
that passes costs no more than one that never met a hurdle. The learning-rate schedule must not
depend on TRAIN_STEPS for the two stages to equal one run (the search gin files use schedules
that do not).

Each trial directory keeps `config.gin` (the trial's whole gin configuration) and the run's
TensorBoard events; checkpoints are deleted unless `keep_checkpoints`.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import shutil
from typing import Any, Mapping, Sequence

import gin

import moetx.lm.models  # noqa: F401  (the configurables every moetx command knows)
from moetx.search.evolution import DONE, HURDLE, Outcome, candidate_bindings
from moetx.trainer import model as model_lib, train as train_lib
from moetx.util import gin_files


@gin.configurable("search_trial")
def _trial_plan(model: Any = gin.REQUIRED, batch_size: int = gin.REQUIRED,
                feature_lengths: Any = gin.REQUIRED) -> tuple[Any, int, dict]:
    return model, batch_size, dict(feature_lengths)


_PLAN_BINDINGS = ("search_trial.model = %MODEL", "search_trial.batch_size = %BATCH_SIZE",
                  "search_trial.feature_lengths = %TASK_FEATURE_LENGTHS")
_registered = False


def register_tasks() -> None:
    """Registers moetx's SeqIO tasks once per process (trials run in fresh worker processes)."""
    global _registered
    if not _registered:
        from moetx import tasks
        from moetx.ranking import tasks as ranking_tasks
        from moetx.vision import tasks as vision_tasks

        tasks.register_all()
        vision_tasks.register_default_tasks()
        ranking_tasks.register_default_tasks()
        _registered = True


def use_compilation_cache(path: str) -> None:
    import jax

    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainingFitness:
    """Scores a candidate by training it (see the module docstring).

    Attributes:
      gin_files: the base run (a model gin and a run gin such as `runs/pretrain.gin`); the
        configuration must define the macros MODEL, BATCH_SIZE, TASK_FEATURE_LENGTHS, MODEL_DIR
        and TRAIN_STEPS, as moetx's and T5X's run files do.
      bindings: extra gin bindings for every trial.
      train_steps: the budget in steps; or
      train_flops: the budget in training FLOPs (the model's `flops_per_step`).
      hurdle_fraction: the share of the budget trained before the hurdle (None: no hurdle).
      metric: the eval metric of the reward; None: `cross_ent_loss` when the model reports it
        (language models: the loss without the z-loss), else `loss`.
      maximize: reward = metric (an accuracy); False: reward = -metric (a loss).
      keep_checkpoints: keep the trial's checkpoints.
      gin_search_paths: extra directories for gin files.
      compilation_cache: share compiled XLA programs between the trials and stages of a search
        through JAX's persistent cache in `SEARCH_DIR/jax_cache` (a candidate that passes its
        hurdle does not compile again; trials with equal programs and shapes compile once).
    """

    gin_files: Sequence[str] = ()
    bindings: Sequence[str] = ()
    train_steps: int | None = None
    train_flops: float | None = None
    hurdle_fraction: float | None = None
    metric: str | None = None
    maximize: bool = False
    keep_checkpoints: bool = False
    gin_search_paths: Sequence[str] = ()
    compilation_cache: bool = True

    def __post_init__(self):
        if not self.gin_files:
            raise ValueError("TrainingFitness needs gin_files (a model and a run gin file).")
        if (self.train_steps is None) == (self.train_flops is None):
            raise ValueError("Give exactly one budget: train_steps or train_flops.")
        if self.hurdle_fraction is not None and not 0.0 < self.hurdle_fraction < 1.0:
            raise ValueError(f"hurdle_fraction must be in (0, 1), got {self.hurdle_fraction}.")
        object.__setattr__(self, "gin_files", tuple(self.gin_files))
        object.__setattr__(self, "bindings", tuple(self.bindings))
        object.__setattr__(self, "gin_search_paths", tuple(self.gin_search_paths))

    def parse(self, extra_bindings: Sequence[str], model_dir: str, steps: int) -> None:
        """Replaces the process's gin configuration with this run's: the base files and
        bindings, `extra_bindings` (a candidate's), MODEL_DIR and TRAIN_STEPS."""
        gin.clear_config()
        gin_files.parse_files(self.gin_files, [
            *self.bindings, *extra_bindings, f"MODEL_DIR = {model_dir!r}",
            f"TRAIN_STEPS = {int(steps)}", *_PLAN_BINDINGS], self.gin_search_paths)

    def _parse(self, candidate: Any, trial_dir: str, steps: int) -> None:
        self.parse(candidate_bindings(candidate), trial_dir, steps)

    def flops_per_step(self, candidate: Any, trial_dir: str) -> float:
        """The candidate model's training FLOPs per step (6N per token plus attention)."""
        self._parse(candidate, trial_dir, 1)
        return self.planned_flops_per_step()

    def planned_flops_per_step(self) -> float:
        """FLOPs per training step of the model in the parsed gin configuration."""
        model, batch_size, lengths = _trial_plan()
        shapes = model.input_shapes(batch_size, lengths)
        _, params, _ = model_lib.abstract_variables(model, shapes)
        return float(model.flops_per_step(params, shapes))

    def budget(self, candidate: Any, trial_dir: str) -> tuple[int, float]:
        """(training steps, FLOPs per step) of the candidate's budget."""
        fps = self.flops_per_step(candidate, trial_dir)
        if self.train_steps is not None:
            return int(self.train_steps), fps
        steps = int(self.train_flops // fps)
        if steps < 1:
            raise ValueError(f"train_flops {self.train_flops:.3g} buys no step of this model "
                             f"({fps:.3g} FLOPs per step).")
        return steps, fps

    def register(self) -> None:
        """Registers the tasks a trial may name, in the trial's own process."""
        register_tasks()

    def reward(self, metrics: Mapping[str, float]) -> tuple[float, str]:
        """(reward, name of the metric it comes from) of a run's eval metrics."""
        metric = self.metric or ("cross_ent_loss" if "cross_ent_loss" in metrics else "loss")
        if metric not in metrics:
            raise ValueError(f"The run reported no eval metric {metric!r} (it has "
                             f"{sorted(metrics)}); set an eval dataset.")
        return (metrics[metric] if self.maximize else -metrics[metric]), metric

    def __call__(self, candidate: Any, trial_dir: str, hurdle: float | None) -> Outcome:
        self.register()
        os.makedirs(trial_dir, exist_ok=True)
        if self.compilation_cache:
            use_compilation_cache(os.path.join(os.path.dirname(os.path.dirname(
                os.path.abspath(trial_dir))), "jax_cache"))
        steps, fps = self.budget(candidate, trial_dir)
        stages = [steps]
        if self.hurdle_fraction is not None and steps >= 2:
            stages = [max(1, round(steps * self.hurdle_fraction)), steps]
        hurdle_reward = None
        metrics: dict[str, float] = {}
        try:
            for k, stage_steps in enumerate(stages):
                self._parse(candidate, trial_dir, stage_steps)
                results = train_lib.train()
                metrics = {key: float(v) for key, v in results.get("eval", {}).items()}
                reward, metric = self.reward(metrics)
                cost = {"steps": float(stage_steps), "flops": float(stage_steps * fps)}
                with open(os.path.join(trial_dir, "config.gin"), "w") as f:
                    f.write(gin.config_str())
                if not math.isfinite(reward):
                    return Outcome(None, "failed", reason=f"eval {metric} is {metrics[metric]}",
                                   cost=cost, metrics=metrics)
                if k < len(stages) - 1:
                    hurdle_reward = reward
                    if hurdle is not None and reward < hurdle:
                        return Outcome(reward, HURDLE, hurdle_reward=reward, cost=cost,
                                       metrics=metrics,
                                       reason=f"reward {reward:.4f} after {stage_steps} steps "
                                              f"is below the hurdle {hurdle:.4f}")
            return Outcome(reward, DONE, hurdle_reward=hurdle_reward, cost=cost,
                           metrics=metrics)
        finally:
            if not self.keep_checkpoints:
                for path in glob.glob(os.path.join(trial_dir, "checkpoint_*")):
                    shutil.rmtree(path, ignore_errors=True)
