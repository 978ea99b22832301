"""Regularized evolution over PyGlove search spaces: hurdles, duplicate detection, failed trials,
a resumable trial log and worker processes.

One search (`Search.run`, gin name `search`):

1. PyGlove's regularized evolution (`pyglove.ext.evolution.regularized_evolution`: a random
   initial population of P, then a tournament of S drawn from the last P trials whose winner is
   mutated) proposes `parallel_trials` DNAs at a time: a *batch*. With `seeds` (Primer's search
   starts from the vanilla Transformer), the initial population is instead the seeds themselves,
   then mutants of them (`SeededInit`); the rest of the search is the same.
2. Each DNA is materialised into a candidate (`pg.materialize`). The candidate checks itself
   (`validate()`, which raises ValueError with the reason: the trial is `rejected`) and is
   fingerprinted on fixed probe inputs (`fingerprint()`): a candidate that computes what an
   earlier one computed is not trained again (`duplicate`, with the earlier reward).
3. The others are trials of the fitness (`Fitness`), each in `SEARCH_DIR/trials/<id>`, run in
   worker processes (or in this process with `num_workers=0`). A trial's compute budget is fixed
   in training steps or FLOPs, never wall time, so a search reproduces. With hurdles, a trial first
   trains a short budget and stops there (`hurdle`) when its early reward is below the median
   early reward of the finished trials, as Primer's search did.
4. Rewards are fed back in trial order once the batch is done, so a seeded search proposes the
   same trials whatever the timing or the number of workers. Every trial (DNA, program text, gin
   bindings, fingerprint, reward, cost, status, reason, time) is appended to
   `SEARCH_DIR/trials.jsonl` as it finishes, and to TensorBoard (`SEARCH_DIR/tb`).

A trial that raises, returns a non-finite reward, or kills its worker (out of memory) is recorded
as `failed` with the reason; the search goes on. Failed and rejected trials are fed back with
`failed_reward` (the worst reward), so evolution never selects them.

Resuming: `run()` on a SEARCH_DIR that has a trial log replays it through a fresh generator with
the same seed. Each proposal is checked against the logged DNA and fed back the logged reward, so
no finished trial runs again and the search continues where it stopped (a partly finished batch
runs only its missing trials). `search.json` records what must not change between runs (seed,
population, tournament, batch size, space, fitness); `num_trials` may grow.

Across machines: the trial log is the search's only state and only this controller writes it.
A trial is a message (the candidate as PyGlove JSON, its trial directory, the hurdle) and its
result an `Outcome` dict, so the local process pool can be replaced by workers on other hosts
that receive trials from the controller (e.g. through a queue directory on the shared file system
holding SEARCH_DIR) without changing the search or its log.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Protocol, Sequence

import gin
import pyglove as pg
from pyglove.ext import evolution

DONE, HURDLE, DUPLICATE, REJECTED, FAILED = "done", "hurdle", "duplicate", "rejected", "failed"
TRIAL_LOG = "trials.jsonl"
HEADER = "search.json"


@dataclasses.dataclass
class Outcome:
    """What one trial gave.

    Attributes:
      reward: higher is better (e.g. minus the validation loss); None when failed/rejected.
      status: DONE, HURDLE (stopped after the short budget), FAILED or REJECTED.
      reason: why a trial failed, was rejected or stopped.
      hurdle_reward: the reward after the short budget, when the fitness has hurdles.
      cost: compute spent, e.g. {'steps': 300, 'flops': 1.2e12}.
      metrics: anything else worth keeping (final eval metrics, ...).
    """

    reward: float | None
    status: str = DONE
    reason: str = ""
    hurdle_reward: float | None = None
    cost: dict[str, float] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


class Fitness(Protocol):
    """Scores a candidate in `trial_dir`. `hurdle` (None: no hurdle yet) is the early reward a
    candidate must reach to get its full budget; fitnesses without stages ignore it."""

    def __call__(self, candidate: Any, trial_dir: str, hurdle: float | None) -> Outcome: ...


# ----------------------------------------------------------------------------- candidates
def candidate_text(candidate: Any) -> str:
    text = getattr(candidate, "text", None)
    if callable(text):
        return text()
    return pg.format(candidate, compact=True) if isinstance(candidate, pg.Symbolic) \
        else str(candidate)


def candidate_bindings(candidate: Any) -> list[str]:
    fn = getattr(candidate, "gin_bindings", None)
    return list(fn()) if callable(fn) else []


def candidate_fingerprint(candidate: Any) -> str:
    """The candidate's own functional fingerprint, else a hash of its symbolic form."""
    fn = getattr(candidate, "fingerprint", None)
    if callable(fn):
        return str(fn())
    return hashlib.sha1(pg.to_json_str(candidate).encode()).hexdigest()


def dna_value(dna: pg.DNA) -> Any:
    """The DNA's values as plain JSON (what the log stores and resume compares)."""
    return dna.to_json(compact=True, type_info=False) if hasattr(dna, "to_json") else dna.value


# ---------------------------------------------------------------------------- trial runner
def run_trial(fitness: Fitness, candidate_json: str, trial_dir: str,
              hurdle: float | None) -> dict[str, Any]:
    """Runs one trial (in a worker process or here) and returns its Outcome as a dict; an
    exception or a non-finite reward becomes a FAILED outcome with the reason."""
    start = time.time()
    try:
        candidate = pg.from_json_str(candidate_json)
        out = fitness(candidate, trial_dir, hurdle)
        if out.reward is None or not math.isfinite(out.reward):
            out = dataclasses.replace(out, reward=None, status=FAILED,
                                      reason=out.reason or f"reward is {out.reward}")
    except Exception as e:  # noqa: BLE001  (any trial error is recorded, the search goes on)
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        out = Outcome(None, FAILED, reason=last[:500])
    result = dataclasses.asdict(out)
    result["seconds"] = round(time.time() - start, 3)
    result["pid"] = os.getpid()
    return result


def _worker_init() -> None:
    """Prepares a fresh worker process as moetx's command lines prepare theirs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    from moetx.util import xla_env

    xla_env.configure_cpu_defaults()


class _Pool:
    """`num_workers` spawned worker processes (JAX is not fork-safe), re-created when a worker
    dies; `num_workers=0` runs trials in this process."""

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self._executor = None

    def _get(self) -> futures.ProcessPoolExecutor:
        if self._executor is None:
            self._executor = futures.ProcessPoolExecutor(
                self.num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init)
        return self._executor

    def run(self, jobs: dict[int, tuple], on_result: Callable[[int, dict], None]) -> None:
        """Runs `jobs` ({trial id: run_trial args}), calling `on_result(id, result)` as each
        finishes. Trials whose worker died are retried one at a time in a fresh process; a
        second death fails the trial."""
        if self.num_workers == 0:
            for i, args in jobs.items():
                on_result(i, run_trial(*args))
            return
        broken = self._run_some(jobs, on_result, self._get())
        for i in broken:
            self.close()
            retry = self._run_some({i: jobs[i]}, on_result, self._get())
            if retry:
                self.close()
                on_result(i, {**dataclasses.asdict(Outcome(
                    None, FAILED, reason="the worker process died (killed, or out of memory)")),
                    "seconds": 0.0, "pid": None})

    def _run_some(self, jobs, on_result, executor) -> list[int]:
        pending = {executor.submit(run_trial, *args): i for i, args in jobs.items()}
        broken = []
        for fut in futures.as_completed(pending):
            i = pending[fut]
            try:
                on_result(i, fut.result())
            except futures.process.BrokenProcessPool:
                broken.append(i)
        return sorted(broken)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


# ------------------------------------------------------------------------------- trial log
class TrialLog:
    """`SEARCH_DIR/trials.jsonl`: one JSON object per finished trial, appended and flushed as it
    finishes (a torn last line from a kill is dropped on reading)."""

    def __init__(self, search_dir: str):
        self.path = os.path.join(search_dir, TRIAL_LOG)

    def read(self) -> dict[int, dict]:
        records = {}
        if not os.path.exists(self.path):
            return records
        with open(self.path) as f:
            lines = f.read().split("\n")
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if n >= len(lines) - 2:  # the last line, cut short by a kill
                    break
                raise ValueError(f"{self.path}: line {n + 1} is not JSON.") from None
            records[int(rec["id"])] = rec
        return records

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def repair(self) -> None:
        """Drops a torn last line so that appends start on a fresh line."""
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            with open(self.path, "wb") as f:
                f.write(data[:data.rfind(b"\n") + 1])


# --------------------------------------------------------------------- seeded initial population
@pg.members([
    ("seeds", pg.typing.List(pg.typing.Object(pg.DNA), min_size=1),
     "DNAs proposed first, once each."),
    ("max_mutations", pg.typing.Int(min_value=1, default=3),
     "Each later proposal is a seed mutated 1..max_mutations times."),
    ("seed", pg.typing.Int().noneable(), "Seeds the choice of parent, count and mutations."),
])
class SeededInit(pg.DNAGenerator):
    """An initial population grown from seed DNAs: the seeds in order, then each proposal a
    random seed with 1..`max_mutations` uniform mutations (one decision re-sampled each)."""

    def _setup(self):
        import random

        self._random = random.Random(self.seed)
        self._mutator = evolution.mutators.Uniform(seed=self._random.randrange(2 ** 31))
        self._seeds = [d.use_spec(self.dna_spec) for d in self.seeds]

    def _propose(self) -> pg.DNA:
        n = self.num_proposals
        if n < len(self._seeds):
            return self._seeds[n].clone(deep=True)
        dna = self._random.choice(self._seeds)
        for _ in range(self._random.randint(1, self.max_mutations)):
            dna = self._mutator.mutate(dna).use_spec(self.dna_spec)
        return dna


def encode_candidate(space: Any, value: Any) -> pg.DNA:
    """The DNA of `value` (a materialised candidate) in `space`, by PyGlove's template."""
    return pg.template(space).encode(value)


# ------------------------------------------------------------------------------------ search
def _failed_or_rejected(rec: dict) -> bool:
    return rec["status"] in (FAILED, REJECTED)


@gin.configurable("search")
@dataclasses.dataclass
class Search:
    """A regularized-evolution search (see the module docstring).

    Attributes:
      search_dir: where the trial log, trial directories, TensorBoard events and plots go.
      space: a PyGlove hyper value (or a function returning one).
      fitness: scores a candidate (`Fitness`); must pickle when `num_workers > 0`.
      num_trials: trials to run in total (a resumed search may raise it).
      population_size, tournament_size: regularized evolution's P and S (S >= 2, P >= S).
      seed: seeds the proposals and the default mutator.
      mutator: a `pyglove.ext.evolution` mutator; default uniform re-sampling of one decision.
      parallel_trials: trials proposed and run per batch (the result does not depend on it
        being run by 1 or many workers).
      num_workers: worker processes (0 runs the trials in this process).
      hurdle_min_trials: finished trials with an early reward needed before the hurdle applies.
      seeds: candidates the initial population starts from (see `SeededInit`); empty: a random
        initial population.
      seed_encoder: (space, seed) -> DNA; default `encode_candidate` (PyGlove's template). A
        space whose seeds are written another way (e.g. program text) names its own.
      seed_mutations: the initial population's mutants carry 1..seed_mutations mutations.
      dedupe: skip candidates whose fingerprint was scored already.
      failed_reward: what failed and rejected trials are fed back as.
      plot: write `best_reward.png` (needs matplotlib) when the search ends.
      verbose: print a progress line per trial.
    """

    search_dir: str = gin.REQUIRED
    space: Any = gin.REQUIRED
    fitness: Any = gin.REQUIRED
    num_trials: int = 100
    population_size: int = 20
    tournament_size: int = 5
    seed: int = 0
    mutator: Any = None
    parallel_trials: int = 1
    num_workers: int = 0
    hurdle_min_trials: int = 5
    seeds: Sequence[Any] = ()
    seed_encoder: Callable[[Any, Any], pg.DNA] | None = None
    seed_mutations: int = 3
    dedupe: bool = True
    failed_reward: float = -1e30
    plot: bool = True
    verbose: bool = True

    def __post_init__(self):
        for name in ("search_dir", "space", "fitness"):
            if getattr(self, name) is gin.REQUIRED:
                raise ValueError(f"search.{name} is required.")
        if callable(self.space) and not isinstance(self.space, pg.Symbolic):
            self.space = self.space()
        if self.tournament_size < 2 or self.population_size < self.tournament_size:
            raise ValueError("Regularized evolution needs tournament_size >= 2 and "
                             f"population_size >= tournament_size; got P={self.population_size},"
                             f" S={self.tournament_size}.")
        if self.num_trials <= 0 or self.parallel_trials <= 0 or self.num_workers < 0:
            raise ValueError("num_trials and parallel_trials must be positive and num_workers "
                             "non-negative.")
        spec = pg.dna_spec(self.space)
        if spec.space_size == 1 or not spec.decision_points:
            raise ValueError(f"The search space has no choices to make: {self.space!r}.")
        self.spec = spec
        encoder = self.seed_encoder or encode_candidate
        seed_dnas = []
        for value in self.seeds:
            try:
                seed_dnas.append(encoder(self.space, value))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"search.seeds: {value!r} is not a point of the space: {e}"
                                 ) from e
        self.seed_dnas = seed_dnas

    # --------------------------------------------------------------------------- bookkeeping
    def _header(self) -> dict:
        return {
            "seed": self.seed, "population_size": self.population_size,
            "tournament_size": self.tournament_size, "parallel_trials": self.parallel_trials,
            "space_sha1": hashlib.sha1(pg.to_json_str(self.space).encode()).hexdigest(),
            "fitness": repr(self.fitness), "mutator": repr(self.mutator),
            **({"seeds": [dna_value(d) for d in self.seed_dnas],
                "seed_mutations": self.seed_mutations} if self.seed_dnas else {}),
        }

    def _check_header(self) -> None:
        path = os.path.join(self.search_dir, HEADER)
        header = self._header()
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            changed = sorted(k for k in header if old.get(k) != header[k])
            if changed:
                raise ValueError(f"{self.search_dir} holds another search (different "
                                 f"{', '.join(changed)}); resume it unchanged or use a new "
                                 "SEARCH_DIR.")
        else:
            with open(path, "w") as f:
                json.dump(header, f, indent=1, sort_keys=True)

    def _algorithm(self):
        mutator = self.mutator if self.mutator is not None else evolution.mutators.Uniform(
            seed=self.seed)
        algo = evolution.regularized_evolution(mutator, self.population_size,
                                               self.tournament_size, seed=self.seed)
        if self.seed_dnas:
            init = SeededInit(seeds=self.seed_dnas, max_mutations=self.seed_mutations,
                              seed=self.seed)
            algo.rebind(population_init=(init, self.population_size), skip_notification=True)
        algo.setup(self.spec)
        return algo

    def _feedback_reward(self, rec: dict) -> float:
        return self.failed_reward if rec["reward"] is None else float(rec["reward"])

    def _hurdle(self, records: dict[int, dict], before: int) -> float | None:
        early = [r["hurdle_reward"] for i, r in records.items()
                 if i < before and r["status"] in (DONE, HURDLE)
                 and r.get("hurdle_reward") is not None]
        if len(early) < self.hurdle_min_trials:
            return None
        return statistics.median(early)

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Runs (or resumes) the search; returns the summary also written to summary.json."""
        os.makedirs(os.path.join(self.search_dir, "trials"), exist_ok=True)
        self._check_header()
        log = TrialLog(self.search_dir)
        log.repair()
        records = log.read()
        algo = self._algorithm()
        pool = _Pool(self.num_workers)
        self._progress = _Progress(self.num_trials, records, self.verbose)
        writer = _TensorBoard(os.path.join(self.search_dir, "tb"))
        try:
            next_id = 0
            while next_id < self.num_trials:
                ids = list(range(next_id, min(next_id + self.parallel_trials, self.num_trials)))
                dnas = [algo.propose() for _ in ids]
                for i, dna in zip(ids, dnas):
                    if i in records and records[i]["dna"] != dna_value(dna):
                        raise ValueError(
                            f"Resuming {self.search_dir}: trial {i} was {records[i]['dna']} but "
                            f"the search now proposes {dna_value(dna)}; the log does not belong "
                            "to this search.")
                todo = [(i, d) for i, d in zip(ids, dnas) if i not in records]
                if todo:
                    self._run_batch(todo, records, log, pool, writer)
                for i, dna in zip(ids, dnas):
                    algo.feedback(dna, self._feedback_reward(records[i]))
                next_id = ids[-1] + 1
        finally:
            pool.close()
            writer.close()
        summary = summarize(records, self.num_trials)
        with open(os.path.join(self.search_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
        if self.plot:
            from moetx.search import report

            report.plot_search(list(records.values()),
                               os.path.join(self.search_dir, "best_reward.png"))
        return summary

    def _run_batch(self, todo: list[tuple[int, pg.DNA]], records: dict[int, dict],
                   log: TrialLog, pool: _Pool, writer: "_TensorBoard") -> None:
        first = min(i for i, _ in todo)
        hurdle = self._hurdle(records, first)
        scored = {r["fingerprint"]: i for i, r in sorted(records.items())
                  if r["status"] in (DONE, HURDLE) and r.get("fingerprint")}
        base: dict[int, dict] = {}
        jobs: dict[int, tuple] = {}
        waiting: dict[int, int] = {}  # duplicate trial -> the trial in this batch it copies
        in_batch: dict[str, int] = {}

        def finish(i: int, result: dict) -> None:
            rec = {**base[i], **result}
            rec["hurdle_threshold"] = hurdle
            records[i] = rec
            log.append(rec)
            writer.write(rec)
            self._progress.update(rec, records)

        for i, dna in todo:
            candidate = pg.materialize(self.space, dna)
            base[i] = {"id": i, "dna": dna_value(dna), "text": candidate_text(candidate),
                       "gin_bindings": candidate_bindings(candidate), "fingerprint": None,
                       "duplicate_of": None, "time": time.time()}
            try:
                validate = getattr(candidate, "validate", None)
                if callable(validate):
                    validate()
                fp = candidate_fingerprint(candidate) if self.dedupe else None
            except ValueError as e:
                finish(i, dataclasses.asdict(Outcome(None, REJECTED, reason=str(e)[:500])))
                continue
            except Exception as e:  # noqa: BLE001  (a candidate that cannot be probed fails)
                finish(i, dataclasses.asdict(Outcome(
                    None, FAILED, reason=f"fingerprint: {type(e).__name__}: {e}"[:500])))
                continue
            base[i]["fingerprint"] = fp
            if fp is not None and fp in scored:
                finish(i, _duplicate_of(records[scored[fp]]))
            elif fp is not None and fp in in_batch:
                waiting[i] = in_batch[fp]
            else:
                if fp is not None:
                    in_batch[fp] = i
                trial_dir = os.path.join(self.search_dir, "trials", f"{i:05d}")
                jobs[i] = (self.fitness, pg.to_json_str(candidate), trial_dir, hurdle)
        pool.run(jobs, finish)
        for i, j in sorted(waiting.items()):
            finish(i, _duplicate_of(records[j]))


def _duplicate_of(rec: dict) -> dict:
    if rec["status"] not in (DONE, HURDLE):
        # The trial it copies failed: not a known function, so the copy fails alike.
        return {**dataclasses.asdict(Outcome(None, FAILED, reason=f"same function as trial "
                                                                  f"{rec['id']}, which failed")),
                "duplicate_of": rec["id"], "seconds": 0.0}
    return {**dataclasses.asdict(Outcome(rec["reward"], DUPLICATE,
                                         reason=f"same function as trial {rec['id']}",
                                         hurdle_reward=None, cost={})),
            "duplicate_of": rec["id"], "seconds": 0.0}


def summarize(records: dict[int, dict], num_trials: int) -> dict[str, Any]:
    """Counts by status, the best fully trained trial and the best-so-far curve."""
    counts: dict[str, int] = {}
    for r in records.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    best, curve = None, []
    for i in sorted(records):
        r = records[i]
        if r["status"] in (DONE, DUPLICATE) and r["reward"] is not None and (
                best is None or r["reward"] > best["reward"]):
            best = r
        curve.append(None if best is None else best["reward"])
    return {"num_trials": num_trials, "finished": len(records), "counts": counts,
            "best": None if best is None else {k: best[k] for k in (
                "id", "reward", "text", "gin_bindings", "cost", "metrics") if k in best},
            "best_reward_curve": curve,
            "cost": {k: sum(float(r.get("cost", {}).get(k, 0.0)) for r in records.values())
                     for k in ("steps", "flops")}}


class _Progress:
    """One line per finished trial: status, reward, best so far, rate and ETA."""

    def __init__(self, total: int, records: dict[int, dict], verbose: bool):
        self.total = total
        self.start = time.time()
        self.done_before = len(records)
        self.verbose = verbose

    def update(self, rec: dict, records: dict[int, dict]) -> None:
        if not self.verbose:
            return
        from moetx.trainer import metrics

        ran = len(records) - self.done_before
        elapsed = time.time() - self.start
        per = elapsed / max(ran, 1)
        eta = per * max(self.total - len(records), 0)
        best = summarize(records, self.total)["best"]
        reward = "-" if rec["reward"] is None else f"{rec['reward']:.4f}"
        best_s = "-" if best is None else f"{best['reward']:.4f} (trial {best['id']})"
        reason = f" [{rec['reason'][:80]}]" if rec.get("reason") and rec["status"] != DONE else ""
        print(f"[search] trial {rec['id']} {rec['status']} reward {reward}{reason} | "
              f"{len(records)}/{self.total} trials, best {best_s} | "
              f"{60.0 / per if ran else 0.0:.1f} trials/min, ETA "
              f"{metrics.format_duration(eta)}", file=sys.stderr, flush=True)


class _TensorBoard:
    """Per-trial scalars (reward, best so far, cost, seconds) at step = trial id."""

    def __init__(self, logdir: str):
        self.logdir = logdir
        self._writer = None
        self._best = -math.inf

    def write(self, rec: dict) -> None:
        if self._writer is None:
            from clu import metric_writers

            self._writer = metric_writers.create_default_writer(self.logdir, asynchronous=False)
        scalars = {f"search/{k}": float(v) for k, v in rec.get("cost", {}).items()}
        scalars["search/seconds"] = float(rec.get("seconds", 0.0))
        if rec["reward"] is not None:
            scalars["search/reward"] = float(rec["reward"])
            if rec["status"] in (DONE, DUPLICATE):
                self._best = max(self._best, float(rec["reward"]))
        if math.isfinite(self._best):
            scalars["search/best_reward"] = self._best
        self._writer.write_scalars(int(rec["id"]), scalars)
        self._writer.write_texts(int(rec["id"]), {"search/program": rec["text"]})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


def run_search(search: Search | None = None) -> dict[str, Any]:
    """The gin entry point: runs the gin-configured `search`."""
    return (search or Search()).run()


def trials(search_dir: str) -> list[dict]:
    """The finished trials of a search, in trial order."""
    records = TrialLog(search_dir).read()
    return [records[i] for i in sorted(records)]


__all__: Sequence[str] = ("Search", "Outcome", "Fitness", "TrialLog", "run_trial", "summarize",
                          "trials", "DONE", "HURDLE", "DUPLICATE", "REJECTED", "FAILED")
