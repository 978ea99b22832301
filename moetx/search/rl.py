"""Evolving RL loss functions (Co-Reyes et al. 2021) on moetx's regularized evolution.

The space (`rl_loss_space`) is a graph of `num_nodes` node slots over the loss language's inputs
(`moetx.rl.losses`): slot i is `Slot(op, a, b)` with `op` any op of the language and `a`, `b` any
input or earlier slot (a unary op ignores `b`), and the last slot is the loss. So a mutation
re-samples one op or one edge; `TypedMutator` retries until the child type checks (most single
re-samples break the types). A graph that does not type check is rejected by `validate()` with
the reason and never trained. Programs are fingerprinted by their outputs (and gradients w.r.t.
Q(s_t)) on fixed probe inputs (`losses.fingerprint`), so dead slots and rewrites that compute the
same loss are scored once.

The population is bootstrapped from DQN as in the paper: `search.seeds` holds loss texts (or
reference names such as 'dqn'), encoded by `encode_loss` (the program's nodes in the last slots,
the first slots filled with dead nodes), and the initial population is the seeds then their
mutants (`evolution.SeededInit`).

`RLFitness` trains a DQN agent with the candidate loss (`moetx.rl.dqn`): first on the hurdle
environment (CartPole-v1); a loss whose normalised return there is below `hurdle_min` (or, with
`use_search_hurdle`, below the search's running median) stops (`hurdle`, reward = its CartPole
score); otherwise it trains on each other training environment, and the reward is the sum of the
normalised returns over all of them, CartPole included, as in the paper.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import gin
import pyglove as pg
from pyglove.ext import evolution as pg_evolution

from moetx.rl import dqn, losses
from moetx.search.evolution import DONE, HURDLE, Outcome

DEFAULT_NUM_NODES = 10
# A dead node that type checks whatever follows it (fills the slots before a seed program).
_FILLER = losses.Node("max_list", (0,))


@pg.members([("op", pg.typing.Str()), ("a", pg.typing.Int(min_value=0)),
             ("b", pg.typing.Int(min_value=0))])
class Slot(pg.Object):
    """One node: op(register a[, register b]); registers 0..5 are the inputs."""


@pg.members([("slots", pg.typing.List(pg.typing.Object(Slot), min_size=1))])
class LossCandidate(pg.Object):
    """A loss graph of the space; the search's candidate protocol (see `evolution`)."""

    def program(self) -> losses.LossProgram:
        return losses.LossProgram(tuple(
            losses.Node(s.op, (s.a, s.b)[:losses.ARITY.get(s.op, 2)]) for s in self.slots))

    def validate(self) -> None:
        """Raises ValueError (`losses.LossTypeError`) with the reason when ill typed."""
        self.program().check()

    def fingerprint(self) -> str:
        return losses.fingerprint(self.program())

    def text(self) -> str:
        """The live program (dead slots dropped), e.g. 'v0 = max_list(qtarg_t); ...'."""
        prog = self.program()
        try:
            prog.check()
        except losses.LossTypeError:
            return prog.text()
        return losses.LossProgram(prog.live()).text()

    def gin_bindings(self) -> list[str]:
        return []


@gin.configurable
def rl_loss_space(num_nodes: int = DEFAULT_NUM_NODES, ops: Sequence[str] = losses.OPS
                  ) -> LossCandidate:
    """`num_nodes` slots, each any op over any input or earlier slot."""
    unknown = sorted(set(ops) - set(losses.OPS))
    if unknown or num_nodes < 1:
        raise ValueError(f"rl_loss_space: num_nodes must be >= 1 (got {num_nodes}) and ops "
                         f"among {losses.OPS} (unknown: {unknown}).")
    return LossCandidate(slots=[
        Slot(op=pg.oneof(list(ops)), a=pg.oneof(list(range(losses.NUM_INPUTS + i))),
             b=pg.oneof(list(range(losses.NUM_INPUTS + i)))) for i in range(num_nodes)])


def candidate_from_program(prog: losses.LossProgram | str, num_nodes: int) -> LossCandidate:
    """The candidate of `prog` (a program, its text or a reference name) in `num_nodes` slots:
    its nodes in the last slots, the first ones dead filler nodes."""
    if isinstance(prog, str):
        prog = losses.program(prog) if prog in losses.PROGRAMS else losses.parse(prog)
    nodes = prog.live()
    pad = num_nodes - len(nodes)
    if pad < 0:
        raise ValueError(f"the program has {len(nodes)} nodes; the space has {num_nodes} slots.")
    shift = {r: r if r < losses.NUM_INPUTS else r + pad
             for r in range(losses.NUM_INPUTS + len(nodes))}
    slots = [Slot(op=_FILLER.op, a=_FILLER.args[0], b=0) for _ in range(pad)]
    for n in nodes:
        regs = [shift[a] for a in n.args]
        slots.append(Slot(op=n.op, a=regs[0], b=regs[1] if len(regs) > 1 else 0))
    return LossCandidate(slots=slots)


@gin.configurable
def encode_loss(space: LossCandidate, seed: Any) -> pg.DNA:
    """The DNA of a seed (a program text or reference name) in `space`."""
    value = candidate_from_program(seed, len(space.slots))
    return pg.template(space).encode(value)


@pg.members([
    ("num_nodes", pg.typing.Int(min_value=1, default=DEFAULT_NUM_NODES), "The space's slots."),
    ("ops", pg.typing.List(pg.typing.Str(), default=list(losses.OPS)), "The space's ops."),
    ("max_tries", pg.typing.Int(min_value=1, default=100),
     "Uniform mutations tried before giving up on a well-typed one."),
    ("distinct", pg.typing.Bool(default=True),
     "Also require the child to compute another loss than its parent (fingerprint)."),
    ("seed", pg.typing.Int().noneable(), "Seeds the mutations."),
])
class TypedMutator(pg_evolution.Mutator):
    """Re-samples one decision (an op or an edge), retrying until the graph type checks.

    Most single re-samples of a typed graph break its types (a LIST where a FLOAT is read), and
    a rejected trial enters the regularized population as a failure; so mutate until the child
    is well typed (up to `max_tries`, else the last try, which the search then rejects with its
    reason). With `distinct`, a child must also compute another loss than its parent: most
    edits of a DQN-seeded graph touch its dead slots, and those copies would otherwise fill the
    population (the search scores them as duplicates, but they use up its trials).
    """

    def _on_bound(self):
        super()._on_bound()
        self._uniform = pg_evolution.mutators.Uniform(seed=self.seed)
        self._space = rl_loss_space(self.num_nodes, tuple(self.ops))

    def mutate(self, dna: pg.DNA, step: int = 0) -> pg.DNA:
        spec = dna.spec if dna.spec is not None else pg.dna_spec(self._space)
        dna = dna.use_spec(spec)
        parent = pg.materialize(self._space, dna)
        parent_fp = parent.fingerprint() if self.distinct and _well_typed(parent) else None
        child = dna
        for _ in range(self.max_tries):
            child = self._uniform.mutate(dna, step).use_spec(spec)
            cand = pg.materialize(self._space, child)
            if _well_typed(cand) and (parent_fp is None or cand.fingerprint() != parent_fp):
                return child
        return child


def _well_typed(candidate: LossCandidate) -> bool:
    try:
        candidate.validate()
    except ValueError:
        return False
    return True


@gin.configurable
def rl_typed_mutator(num_nodes: int = DEFAULT_NUM_NODES, ops: Sequence[str] = losses.OPS,
                     max_tries: int = 100, distinct: bool = True,
                     seed: int | None = 0) -> TypedMutator:
    return TypedMutator(num_nodes=num_nodes, ops=list(ops), max_tries=max_tries,
                        distinct=distinct, seed=seed)


@gin.configurable
def rl_dqn_config(**kwargs) -> dqn.DQNConfig:
    """A `DQNConfig` from gin (e.g. `rl_dqn_config.total_env_steps = 20000`)."""
    return dqn.DQNConfig(**kwargs)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RLFitness:
    """Sum of normalised DQN returns over the training environments (see the module docstring).

    Attributes:
      envs: the training environments after the hurdle one (gymnax names, `moetx.rl.envs`).
      hurdle_env: trained first; a loss that fails there trains on nothing else.
      hurdle_min: the normalised return on `hurdle_env` a loss must reach.
      use_search_hurdle: also require the search's running median of hurdle scores.
      config: the agent's hyperparameters and budget (per environment).
      env_configs: per-environment overrides of `config` ((env name, DQNConfig) pairs).
      seed: the agent's seed (the same for every candidate, so rewards compare).
    """

    envs: Sequence[str] = ("Acrobot-v1",)
    hurdle_env: str = "CartPole-v1"
    hurdle_min: float = 0.1
    use_search_hurdle: bool = False
    config: dqn.DQNConfig = dqn.DQNConfig()
    env_configs: Sequence[tuple[str, dqn.DQNConfig]] = ()
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "envs", tuple(self.envs))
        object.__setattr__(self, "env_configs", tuple(tuple(p) for p in self.env_configs))
        from moetx.rl import envs as env_lib

        for name in (self.hurdle_env, *self.envs, *(n for n, _ in self.env_configs)):
            env_lib.spec(name)

    def config_for(self, env_name: str) -> dqn.DQNConfig:
        return dict(self.env_configs).get(env_name, self.config)

    def __call__(self, candidate: Any, trial_dir: str, hurdle: float | None) -> Outcome:
        prog = candidate.program()
        os.makedirs(trial_dir, exist_ok=True)
        results = [dqn.train(self.hurdle_env, prog, self.config_for(self.hurdle_env),
                             self.seed)]
        first = results[0].normalized_return
        threshold = self.hurdle_min
        if self.use_search_hurdle and hurdle is not None:
            threshold = max(threshold, hurdle)
        status, reason = DONE, ""
        if first < threshold:
            status = HURDLE
            reason = f"{self.hurdle_env} normalised return {first:.4g} < hurdle {threshold:.4g}"
        else:
            results += [dqn.train(name, prog, self.config_for(name), self.seed)
                        for name in self.envs]
        reward = sum(r.normalized_return for r in results)
        metrics = {r.env_name: {"mean_return": r.mean_return,
                                "normalized_return": r.normalized_return,
                                "episodes": r.episodes, "seconds": r.seconds}
                   for r in results}
        with open(os.path.join(trial_dir, "result.json"), "w") as f:
            json.dump({"program": candidate.text(), "reward": reward, "status": status,
                       "results": [dataclasses.asdict(r) for r in results]}, f)
        return Outcome(reward, status, reason=reason, hurdle_reward=first,
                       cost={"steps": float(sum(r.env_steps for r in results))},
                       metrics=metrics)


def compare_losses(env_name: str, programs: dict[str, str], seeds: Sequence[int] = (0, 1, 2),
                   config: dqn.DQNConfig = dqn.DQNConfig()) -> dict[str, dict[str, Any]]:
    """Trains each loss (name -> program text or reference name) on `env_name` with each seed
    at the same budget; returns name -> {'returns': per seed, 'mean', 'std', 'normalized_mean'}
    (e.g. DQN, DQNReg, DQNClipped and the best loss found, on a held-out environment)."""
    import numpy as np

    out = {}
    for name, text in programs.items():
        prog = losses.program(text) if text in losses.PROGRAMS else losses.parse(text)
        runs = [dqn.train(env_name, prog, config, seed) for seed in seeds]
        returns = [r.mean_return for r in runs]
        out[name] = {"program": prog.text(), "seeds": list(seeds), "returns": returns,
                     "mean": float(np.mean(returns)), "std": float(np.std(returns)),
                     "normalized_mean": float(np.mean([r.normalized_return for r in runs]))}
    return out
