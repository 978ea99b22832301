"""The search machinery on stub fitnesses: PyGlove's floatv toy, determinism, hurdles, duplicate
detection, failed trials, resume after a kill, worker processes, and its bad inputs."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pyglove as pg
import pytest

from moetx.search import evolution, spaces, toy

from tests.conftest import REPO_ROOT


def choice_space():
    return pg.Dict(a=pg.oneof([0, 1, 2, 3]), b=pg.oneof([0, 1, 2]), c=pg.oneof([0, 5]))


def make_search(tmp_path, name="s", **kw):
    args = dict(search_dir=str(tmp_path / name), space=choice_space(),
                fitness=toy.ChoiceFitness(), num_trials=24, population_size=6,
                tournament_size=2, seed=0, hurdle_min_trials=3, verbose=False, plot=False)
    args.update(kw)
    return evolution.Search(**args)


def proposals(records):
    return [(r["id"], r["dna"], r["status"], r["reward"]) for r in records]


def test_floatv_toy_reaches_reward_one(tmp_path):
    """PyGlove's own sanity search: reward = the value, mutations of at most 0.01."""
    s = evolution.Search(search_dir=str(tmp_path / "toy"), space=toy.floatv_space(),
                         fitness=toy.ValueFitness(), num_trials=300, population_size=10,
                         tournament_size=2, seed=1, mutator=toy.small_step_mutator(seed=1),
                         verbose=False, plot=False)
    summary = s.run()
    assert summary["best"]["reward"] == 1.0
    curve = [r for r in summary["best_reward_curve"] if r is not None]
    assert curve == sorted(curve) and curve[0] < 0.9


def test_a_seeded_search_is_deterministic(tmp_path):
    one = make_search(tmp_path, "one")
    one.run()
    two = make_search(tmp_path, "two")
    two.run()
    a, b = evolution.trials(one.search_dir), evolution.trials(two.search_dir)
    assert proposals(a) == proposals(b)
    assert len({json.dumps(r["dna"]) for r in a}) > 5  # it explored
    other = make_search(tmp_path, "seed1", seed=1)
    other.run()
    assert proposals(evolution.trials(other.search_dir)) != proposals(a)


def test_hurdles_stop_candidates_below_the_running_median(tmp_path):
    s = make_search(tmp_path, num_trials=30, parallel_trials=3)
    s.run()
    recs = evolution.trials(s.search_dir)
    hurdled = [r for r in recs if r["status"] == evolution.HURDLE]
    assert hurdled, "some candidates must meet the hurdle"
    for r in recs:
        # The threshold is the median early reward of the trials of earlier batches.
        first = r["id"] - r["id"] % 3
        early = [q["hurdle_reward"] for q in recs if q["id"] < first
                 and q["status"] in (evolution.DONE, evolution.HURDLE)]
        expected = statistics.median(early) if len(early) >= 3 else None
        assert r["hurdle_threshold"] == expected
        if r["status"] == evolution.HURDLE:
            assert r["reward"] == r["hurdle_reward"] < expected and r["cost"] == {"steps": 1}
        elif r["status"] == evolution.DONE:
            assert expected is None or r["hurdle_reward"] >= expected
            assert r["cost"] == {"steps": 2}


def test_duplicates_are_scored_once(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    s = make_search(tmp_path, fitness=toy.ChoiceFitness(marker_dir=str(marks)),
                    parallel_trials=4)
    s.run()
    recs = evolution.trials(s.search_dir)
    dups = [r for r in recs if r["status"] == evolution.DUPLICATE]
    assert dups
    for r in dups:
        first = recs[r["duplicate_of"]]
        assert first["id"] < r["id"] and first["fingerprint"] == r["fingerprint"]
        assert r["reward"] == first["reward"] and r["cost"] == {}
    ran = {int(p.name) for p in marks.iterdir()}
    assert ran == {r["id"] for r in recs if r["status"] != evolution.DUPLICATE}
    fps = [r["fingerprint"] for r in recs if r["id"] in ran]
    assert len(fps) == len(set(fps))


def test_failed_and_rejected_trials_are_recorded_and_the_search_goes_on(tmp_path):
    s = make_search(tmp_path, fitness=toy.ChoiceFitness(raise_on=("a", 3), nan_on=("b", 2)))
    s.run()
    recs = evolution.trials(s.search_dir)
    assert len(recs) == 24
    failed = [r for r in recs if r["status"] == evolution.FAILED]
    reasons = {r["reason"] for r in failed}
    assert "RuntimeError: injected failure for a=3" in reasons
    assert "reward is nan" in reasons
    assert all(r["reward"] is None for r in failed)
    assert any(r["status"] == evolution.DONE for r in recs)
    # A candidate that rejects itself is recorded with its reason, before any training.
    bad = spaces.gin_space({"lower_case_macro": [1, 2]})
    s2 = evolution.Search(search_dir=str(tmp_path / "bad"), space=bad,
                          fitness=toy.ValueFitness(), num_trials=2, population_size=2,
                          tournament_size=2, verbose=False, plot=False)
    s2.run()
    for r in evolution.trials(s2.search_dir):
        assert r["status"] == evolution.REJECTED
        assert "neither a configurable's parameter nor a macro" in r["reason"]


def test_resume_replays_the_log_without_running_a_trial_twice(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    fit = toy.ChoiceFitness(marker_dir=str(marks))
    full = make_search(tmp_path, "full", fitness=toy.ChoiceFitness(), parallel_trials=2)
    full.run()
    # Stop after 9 trials (mid-batch), leaving a line torn by a kill; then resume to 24.
    part = make_search(tmp_path, "part", fitness=fit, parallel_trials=2, num_trials=9)
    part.run()
    log = os.path.join(part.search_dir, evolution.TRIAL_LOG)
    with open(log, "a") as f:
        f.write('{"id": 9, "dna": [0, ')
    make_search(tmp_path, "part", fitness=fit, parallel_trials=2).run()
    a, b = evolution.trials(full.search_dir), evolution.trials(part.search_dir)
    assert proposals(a) == proposals(b)
    assert sorted(int(p.name) for p in marks.iterdir()) == sorted(
        {r["id"] for r in b if r["status"] != evolution.DUPLICATE})
    assert all(p.read_text() == "ran\n" for p in marks.iterdir())  # none ran twice
    # Another search in the same directory is refused.
    with pytest.raises(ValueError, match="holds another search"):
        make_search(tmp_path, "part", seed=3).run()


def test_workers_run_trials_in_parallel_and_a_dead_worker_fails_only_its_trial(tmp_path):
    workers = make_search(tmp_path, "workers", parallel_trials=4, num_trials=12,
                          num_workers=2, fitness=toy.ChoiceFitness(die_on=("a", 3)))
    workers.run()
    recs = evolution.trials(workers.search_dir)
    died = [r for r in recs if r["status"] == evolution.FAILED]
    assert died and all(r["reason"] == "the worker process died (killed, or out of memory)"
                        for r in died)
    assert all(r["text"].count("a=3") or r["duplicate_of"] is not None for r in died)
    pids = {r["pid"] for r in recs if r["status"] == evolution.DONE}
    assert len(pids) >= 2  # trials ran in more than one worker process
    # The same search in this process, with the dying trials failing by exception instead:
    # the same proposals and rewards, whatever ran them.
    serial = make_search(tmp_path, "serial", parallel_trials=4, num_trials=12,
                         fitness=toy.ChoiceFitness(raise_on=("a", 3)))
    serial.run()
    key = lambda recs: [(r["id"], r["dna"], r["status"], r["reward"]) for r in recs]  # noqa
    assert key(recs) == key(evolution.trials(serial.search_dir))


def test_bad_searches_are_refused():
    with pytest.raises(ValueError, match="no choices"):
        evolution.Search(search_dir="/tmp/x", space=pg.Dict(a=1), fitness=toy.ValueFitness())
    with pytest.raises(ValueError, match="tournament_size >= 2"):
        evolution.Search(search_dir="/tmp/x", space=choice_space(), fitness=toy.ValueFitness(),
                         tournament_size=1)
    with pytest.raises(ValueError, match="empty list"):
        spaces.gin_space({"TransformerConfig.mlp_dim": []})


def test_gin_space_materialises_gin_bindings():
    space = spaces.gin_space({"TransformerConfig.mlp_dim": [32, 64],
                              "TransformerConfig.mlp_activations": [("gelu", "linear"),
                                                                    ("squared_relu",)],
                              "rsqrt_schedule.base_learning_rate": (0.1, 2.0)})
    spec = pg.dna_spec(space)
    for seed in range(10):
        import random
        dna = pg.random_dna(spec, random.Random(seed))
        cand = pg.materialize(space, dna)
        assert pg.template(space).encode(cand) == dna
        lines = cand.gin_bindings()
        assert lines[0] in ("TransformerConfig.mlp_activations = ('gelu', 'linear')",
                            "TransformerConfig.mlp_activations = ('squared_relu',)")
        assert lines[1] in ("TransformerConfig.mlp_dim = 32", "TransformerConfig.mlp_dim = 64")
        lr = float(lines[2].split("=")[1])
        assert 0.1 <= lr <= 2.0


def test_the_command_resumes_after_sigkill(tmp_path):
    """`python -m moetx.search.run` killed mid-search, then run again: the log holds every trial
    once and no trial ran twice."""
    marks = tmp_path / "marks"
    marks.mkdir()
    search_dir = tmp_path / "cli"
    cmd = [sys.executable, "-m", "moetx.search.run", "--gin_file=search/toy.gin",
           f"--gin.SEARCH_DIR='{search_dir}'", "--gin.search.num_trials=24",
           "--gin.search.space=@pyglove_choice_space()",
           f"--gin.search.fitness=@ChoiceFitness()",
           f"--gin.ChoiceFitness.marker_dir='{marks}'", "--gin.ChoiceFitness.delay=0.2",
           "--gin.search.mutator=None", "--gin.search.plot=False"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT), stderr=subprocess.PIPE,
                            text=True)
    log = search_dir / evolution.TRIAL_LOG
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and log.read_text().count("\n") >= 6:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = log.read_text().count("\n")
    assert 6 <= done_before < 24
    out = subprocess.run(cmd, env=env, cwd=str(REPO_ROOT), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = evolution.trials(str(search_dir))
    assert [r["id"] for r in recs] == list(range(24))
    ran = {int(p.name): p.read_text().count("ran") for p in marks.iterdir()}
    # Only a trial that was running at the kill may have started twice.
    assert sum(n > 1 for n in ran.values()) <= 1
    assert set(ran) == {r["id"] for r in recs if r["status"] != evolution.DUPLICATE}


@pytest.mark.parametrize("name", ["toy", "nos_proxy", "primer_proxy"])
def test_the_shipped_search_gin_files_build_their_search(name, tmp_path):
    """Each gin file under gin/search parses and builds its search (space, fitness) unchanged."""
    import gin

    from moetx.search import fitness  # noqa: F401  (configurables the gin files name)
    from moetx.util import gin_files

    gin.clear_config()
    try:
        gin_files.parse_files([f"search/{name}.gin"], [f"SEARCH_DIR = '{tmp_path}'"])
        s = evolution.Search()
        spec = pg.dna_spec(s.space)
        import random
        cand = pg.materialize(s.space, pg.random_dna(spec, random.Random(0)))
        assert isinstance(evolution.candidate_bindings(cand), list)
        if name != "toy":
            assert s.fitness.gin_files and s.num_workers == 2
        if name == "primer_proxy":  # the population starts from T5.1.1's block
            from moetx.lm import programs

            (seed,) = s.seed_dnas
            assert pg.materialize(s.space, seed).text() == programs.SEED_PROGRAM
    finally:
        gin.clear_config()


@pytest.mark.parametrize("name", ["nos_baselines", "nos_transfer", "primer_transfer",
                                  "primer_proxy_retrain"])
def test_the_shipped_comparison_gin_files_parse(name, tmp_path):
    """Each comparison under gin/search binds its arms, and every arm's bindings parse on top of
    the base run (what `compare` does before training each arm)."""
    import gin

    from moetx.search import compare, fitness
    from moetx.util import gin_files

    gin.clear_config()
    try:
        gin_files.parse_files([f"search/{name}.gin"], [f"OUTPUT_DIR = '{tmp_path}'"])
        cfg = {k: gin.query_parameter(f"compare.{k}") for k in ("gin_files", "arms", "bindings")}
    finally:
        gin.clear_config()
    assert len(cfg["arms"]) >= 2
    base = fitness.TrainingFitness(gin_files=cfg["gin_files"], bindings=tuple(cfg["bindings"]),
                                   train_steps=1, compilation_cache=False)
    try:
        for arm, bindings in cfg["arms"].items():
            base.parse(list(bindings), str(tmp_path / arm), 1)
            assert base.planned_flops_per_step() > 0, arm
    finally:
        gin.clear_config()
    assert callable(compare.compare)


def test_a_seeded_initial_population_starts_from_the_seeds(tmp_path):
    """With seeds, trial 0 is the seed and the rest of the initial population are its mutants
    (1..seed_mutations decisions away); the seeds are part of the search's identity."""
    seed = {"a": 0, "b": 0, "c": 0}
    s = make_search(tmp_path, "seeded", seeds=[seed], seed_mutations=2, num_trials=12)
    s.run()
    records = evolution.trials(s.search_dir)
    assert records[0]["dna"] == [0, 0, 0]
    initial = [r["dna"] for r in records[1:s.population_size]]
    distances = [sum(x != y for x, y in zip(d, [0, 0, 0])) for d in initial]
    assert max(distances) <= 2 and sum(distances) > 0
    random_init = make_search(tmp_path, "random", num_trials=12)
    random_init.run()
    far = [sum(x != 0 for x in r["dna"]) for r in evolution.trials(random_init.search_dir)[:6]]
    assert max(far) == 3  # an unseeded population is not drawn near the seed
    # deterministic, and a different seed list is another search
    again = make_search(tmp_path, "seeded2", seeds=[seed], seed_mutations=2, num_trials=12)
    again.run()
    assert proposals(evolution.trials(again.search_dir)) == proposals(records)
    with pytest.raises(ValueError, match="another search"):
        make_search(tmp_path, "seeded", seeds=[{"a": 1, "b": 0, "c": 0}],
                    seed_mutations=2).run()
    with pytest.raises(ValueError, match="not a point of the space"):
        make_search(tmp_path, "bad_seed", seeds=[{"a": 7, "b": 0, "c": 0}])
