"""The Evolving RL search: the space's candidates, seeds bootstrapped from DQN, and the search
end to end on a tiny budget (deterministic with a seed, resumable after a kill)."""

import json
import os
import random

import pyglove as pg
import pytest

from moetx.rl import dqn, losses
from moetx.search import evolution, rl

TINY = dqn.DQNConfig(total_env_steps=400, num_envs=4, buffer_size=256, batch_size=16,
                     learning_starts=100, eps_decay_steps=200, chunk_iterations=50,
                     hidden=(8,))


def test_seeds_encode_into_the_space_and_back():
    space = rl.rl_loss_space(num_nodes=8)
    for name in ("dqn", "dqn_reg", "double_dqn", "cql"):
        cand = pg.materialize(space, rl.encode_loss(space, name))
        cand.validate()
        assert cand.text() == losses.PROGRAMS[name]
        assert cand.fingerprint() == losses.fingerprint(losses.program(name))
    with pytest.raises(ValueError, match="12 nodes; the space has 8 slots"):
        rl.encode_loss(space, "dqn_clipped")


def test_ill_typed_candidates_are_rejected_with_the_reason():
    space = rl.rl_loss_space(num_nodes=4)
    spec = pg.dna_spec(space)
    rng = random.Random(0)
    reasons = set()
    for _ in range(20):
        cand = pg.materialize(space, pg.random_dna(spec, rng))
        try:
            cand.validate()
        except ValueError as e:
            reasons.add(str(e).split(":")[0])
    assert reasons  # random graphs rarely type check; each failure names its node or the loss


def make_search(tmp_path, name, **kw):
    args = dict(search_dir=str(tmp_path / name), space=rl.rl_loss_space(num_nodes=6),
                fitness=rl.RLFitness(envs=("Acrobot-v1",), hurdle_min=0.0, config=TINY),
                num_trials=6, population_size=3, tournament_size=2, seed=0,
                seeds=["dqn"], seed_encoder=rl.encode_loss, verbose=False, plot=False)
    args.update(kw)
    return evolution.Search(**args)


def outcomes(search_dir):
    return [(r["id"], r["dna"], r["status"], r["reward"]) for r in evolution.trials(search_dir)]


def test_search_runs_end_to_end_deterministically_and_resumes(tmp_path):
    full = make_search(tmp_path, "full")
    summary = full.run()
    recs = evolution.trials(full.search_dir)
    assert recs[0]["text"] == losses.PROGRAMS["dqn"] and recs[0]["status"] == evolution.DONE
    assert set(recs[0]["metrics"]) == {"CartPole-v1", "Acrobot-v1"}
    assert summary["finished"] == 6 and summary["best"] is not None
    with open(os.path.join(full.search_dir, "trials", "00000", "result.json")) as f:
        assert json.load(f)["program"] == losses.PROGRAMS["dqn"]
    # The same seed proposes and scores the same trials.
    again = make_search(tmp_path, "again")
    again.run()
    assert outcomes(again.search_dir) == outcomes(full.search_dir)
    # Killed after 3 trials with a torn last line, then resumed: the same search.
    part = make_search(tmp_path, "part", num_trials=3)
    part.run()
    with open(os.path.join(part.search_dir, evolution.TRIAL_LOG), "a") as f:
        f.write('{"id": 3, "dna": [')
    make_search(tmp_path, "part").run()
    assert outcomes(part.search_dir) == outcomes(full.search_dir)


def test_hurdle_stops_losses_that_fail_cartpole(tmp_path):
    fit = rl.RLFitness(envs=("Acrobot-v1",), hurdle_min=0.99, config=TINY)
    cand = rl.candidate_from_program("dqn", 6)
    out = fit(cand, str(tmp_path / "t"), None)
    assert out.status == evolution.HURDLE and "CartPole-v1" in out.reason
    assert set(out.metrics) == {"CartPole-v1"} and out.reward == out.hurdle_reward


def test_the_shipped_gin_file_builds_its_search(tmp_path):
    import gin

    from moetx.util import gin_files

    gin.clear_config()
    try:
        gin_files.parse_files(["search/rl_proxy.gin"], [f"SEARCH_DIR = '{tmp_path}'"])
        s = evolution.Search()
        (seed,) = s.seed_dnas
        assert pg.materialize(s.space, seed).text() == losses.PROGRAMS["dqn"]
        assert s.fitness.envs == ("Acrobot-v1", "Breakout-MinAtar")
        assert s.fitness.config_for("Breakout-MinAtar").hidden == (128, 128)
    finally:
        gin.clear_config()


def test_compare_losses_trains_each_loss_with_each_seed():
    out = rl.compare_losses("CartPole-v1", {"dqn": "dqn", "dqn_reg": "dqn_reg"}, seeds=(0, 1),
                            config=TINY)
    assert set(out) == {"dqn", "dqn_reg"}
    assert all(len(v["returns"]) == 2 and v["std"] >= 0.0 for v in out.values())


def test_typed_mutator_proposes_well_typed_graphs():
    space = rl.rl_loss_space(num_nodes=6)
    mutator = rl.rl_typed_mutator(num_nodes=6, seed=0)
    dna = rl.encode_loss(space, "dqn")
    texts = set()
    for _ in range(10):
        child = mutator.mutate(dna)
        cand = pg.materialize(space, child)
        cand.validate()
        assert cand.fingerprint() != losses.fingerprint(losses.program("dqn"))
        texts.add(cand.text())
    assert len(texts) > 1
