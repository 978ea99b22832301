"""Backprop Evolution (moetx.search.backprop): the model wrapper on a real moetx model, the
candidate protocol (DNA, text, validate, fingerprint), the shipped gin files, and a search of
training runs end to end."""

import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pyglove as pg
import pytest

from moetx.nn import backward
from moetx.search import backprop, evolution
from moetx.trainer import model as model_lib
from moetx.util import gin_files


# --------------------------------------------------------------------- the model wrapper
@pytest.fixture(scope="module")
def vision_model():
    from moetx.vision import model as vision_model_lib

    inner = vision_model_lib.ImageClassificationModel(model_name="tiny/s", num_classes=10,
                                                      label_smoothing=0.1)
    shapes = inner.input_shapes(8, {"image": (12, 12, 1)})
    variables = inner.get_initial_variables(jax.random.PRNGKey(0), shapes)
    rng = np.random.RandomState(0)
    batch = {"image": jnp.asarray(rng.randint(0, 256, (8, 12, 12, 1)), jnp.uint8),
             "label": jnp.asarray(rng.randint(0, 10, (8,)), jnp.int32),
             "mask": jnp.ones((8,), jnp.float32)}
    import flax.linen as nn

    params = nn.unbox(variables["params"])
    state = {"batch_stats": variables["batch_stats"]}
    return inner, params, state, batch


def _train_grads(model, params, state, batch):
    weights, factor = model.loss_weights_and_factor(batch)
    fn = jax.jit(jax.value_and_grad(
        lambda p: model.loss_fn(p, batch, jax.random.PRNGKey(5), weights, factor,
                                model_state=state), has_aux=True))
    (loss, (metrics, new_state)), grads = fn(params)
    return loss, metrics, new_state, grads


def _all_equal(a, b) -> bool:
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda u, v: bool(np.array_equal(u, v)), a, b)))


def test_identity_rules_train_a_real_moetx_model_exactly_as_backprop(vision_model):
    inner, params, state, batch = vision_model
    wrapped = backprop.BackwardRuleModel(inner, dense_rule=backward.BACKPROP,
                                         conv_rule=backward.BACKPROP)
    model_lib.check_model(wrapped)
    plain = _train_grads(inner, params, state, batch)
    ruled = _train_grads(wrapped, params, state, batch)
    # loss, metric sums, batch-norm statistics and every parameter gradient, bit for bit
    assert _all_equal(plain, ruled)
    assert set(ruled[3]) == {"conv0", "bn0", "conv1", "bn1", "conv2", "bn2", "head"}
    # a rule changes the gradients only; evaluation is the inner model's
    noisy = backprop.BackwardRuleModel(inner, conv_rule="add(g, noise)")
    changed = _train_grads(noisy, params, state, batch)
    assert _all_equal(plain[:3], changed[:3])
    assert not np.array_equal(plain[3]["conv0"]["kernel"], changed[3]["conv0"]["kernel"])
    assert np.array_equal(plain[3]["head"]["kernel"], changed[3]["head"]["kernel"])
    assert _all_equal(noisy.eval_fn(params, batch, state), inner.eval_fn(params, batch, state))
    assert (noisy.state_collections, noisy.count_unit, noisy.loss_metric) == (
        ("batch_stats",), "examples", "loss")
    assert noisy.num_classes == 10  # anything else is the inner model's
    with pytest.raises(ValueError, match="Unknown operand 'q'"):
        backprop.BackwardRuleModel(inner, dense_rule="add(g, q)")


def test_identity_rules_train_the_tiny_decoder_lm_exactly_as_backprop():
    # Every projection of the decoder (attention, MLP, logits) is a moetx DenseGeneral.
    import flax.linen as nn

    from moetx.lm import models, transformer
    from tests.conftest import packed_batch

    cfg = transformer.TransformerConfig(vocab_size=128, emb_dim=32, num_heads=2, head_dim=16,
                                        mlp_dim=64, num_decoder_layers=2)
    inner = models.DecoderOnlyModel(cfg)
    shapes = inner.input_shapes(4, {"targets": 16})
    params = nn.unbox(inner.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
    batch = {k: jnp.asarray(v) for k, v in packed_batch(4, 16, seed=1).items()}
    wrapped = backprop.BackwardRuleModel(inner, dense_rule=backward.BACKPROP)
    plain, ruled = (_train_grads(m, params, {}, batch) for m in (inner, wrapped))
    assert _all_equal(plain, ruled)
    assert len(jax.tree_util.tree_leaves(ruled[3])) == 22


# ------------------------------------------------------------------------------ candidates
@pytest.fixture(scope="module")
def space():
    return backprop.backprop_space()


def test_dna_and_text_round_trip(space):
    spec = pg.dna_spec(space)
    r = random.Random(0)
    for _ in range(20):
        dna = pg.random_dna(spec, r)
        cand = pg.materialize(space, dna)
        again = backprop.parse_candidate(cand.text())
        assert again == cand and again.text() == cand.text()
        assert backprop.encode_backprop(space, cand.text()) == dna
        assert pg.from_json_str(pg.to_json_str(cand)) == cand
    seed = pg.materialize(space, backprop.encode_backprop(space, backprop.BACKPROP_CANDIDATE))
    assert seed.text() == "dense=keep_left(g, one); conv=keep_left(g, one)"
    deep = backprop.backprop_space(max_depth=2)
    nested = backprop.parse_candidate("dense=add(g, mul(bn_g, noise)); conv=plain")
    with pytest.raises(ValueError, match="not a point of the space"):
        backprop.encode_backprop(deep, nested)  # conv=plain is outside a space over both kinds
    conv_only = backprop.backprop_space(kinds=("conv",), max_depth=2)
    cand = backprop.parse_candidate("conv=add(g, mul(bn_g, noise))")
    assert pg.materialize(conv_only, backprop.encode_backprop(conv_only, cand)) == cand
    assert cand.text() == "dense=plain; conv=add(g, mul(bn_g, noise))"


def test_gin_bindings_select_the_rules(clean_gin):
    import gin

    cand = backprop.parse_candidate("dense=plain; conv=mul(g, sign(y))")
    gin_files.parse_files(["vision/fashion_mnist.gin"], [
        *cand.gin_bindings(), "MODEL_DIR = '/tmp/unused'", "TRAIN_STEPS = 1",
        "MODEL = @BackwardRuleModel()", "BackwardRuleModel.model = @ImageClassificationModel()"])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    assert isinstance(model, backprop.BackwardRuleModel)
    assert model.dense_rule is None and model.conv_rule.text() == "mul(g, sign(y))"


@pytest.mark.parametrize("text,reason", [
    ("dense=keep_left(y, g); conv=plain",
     "dense rule keep_left(y, g): the backward pass does not depend on the gradient: no "
     "gradient operand (bn_g, g, ln_g) reaches g' (keep_left drops its right argument)"),
    ("dense=plain; conv=add(noise, w_rms)", "conv rule add(noise, w_rms): the backward pass "
                                            "does not depend on the gradient"),
    ("dense=plain; conv=mul(g, 0.0)", "is the same for different gradients"),
    ("dense=div(exp(1000.0), g); conv=plain", "g' is not finite"),
])
def test_validate_rejects_rules_that_cannot_train_with_the_reason(text, reason):
    with pytest.raises(ValueError) as info:
        backprop.parse_candidate(text).validate()
    assert reason in str(info.value)


def test_fingerprints_identify_rules_by_what_they_compute():
    fp = lambda text: backprop.parse_candidate(text).fingerprint()  # noqa: E731
    plain = fp(backprop.BACKPROP_CANDIDATE)
    for same in ["dense=plain; conv=plain", "dense=max(g, g); conv=keep_left(g, y)",
                 "dense=mul(g, one); conv=min(g, g)"]:
        assert fp(same) == plain, same
    assert fp("dense=add(g, g); conv=plain") == fp("dense=mul(2.0, g); conv=plain")
    assert fp("dense=plain; conv=mul(g, bn_g)") == fp("dense=plain; conv=mul(bn_g, g)")
    different = [fp(t) for t in ["dense=add(g, noise); conv=plain",
                                 "dense=plain; conv=add(g, noise)",
                                 "dense=plain; conv=mul(g, bn_g)",
                                 "dense=keep_left(sign(g), one); conv=plain",
                                 "dense=keep_left(bn_g, one); conv=plain",
                                 "dense=keep_left(bn_g, one); conv=keep_left(bn_g, one)"]]
    assert plain not in different and len(set(different)) == len(different)


def test_bad_spaces_and_candidate_texts_are_refused():
    with pytest.raises(ValueError, match="Unknown operands"):
        backprop.rule_space(operands=("g", "m"))
    with pytest.raises(ValueError, match="kinds must be some of"):
        backprop.backprop_space(kinds=("attention",))
    with pytest.raises(ValueError, match="expected '<kind>=<rule>'"):
        backprop.parse_candidate("keep_left(g, one)")
    with pytest.raises(ValueError, match="gives the conv rule twice"):
        backprop.parse_candidate("conv=plain; conv=plain")


# -------------------------------------------------------------------------------- gin files
def test_the_proxy_gin_builds_its_search(tmp_path, clean_gin):
    gin_files.parse_files(["search/backprop_proxy.gin"], [f"SEARCH_DIR = '{tmp_path}'"])
    s = evolution.Search()
    assert isinstance(s.fitness, backprop.AccuracyFitness)
    assert s.fitness.metric == "accuracy" and s.fitness.hurdle_fraction == 0.5
    (seed,) = s.seed_dnas  # plain backprop
    assert pg.materialize(s.space, seed).fingerprint() == backprop.parse_candidate(
        backprop.BACKPROP_CANDIDATE).fingerprint()
    # every trial's configuration builds the wrapped model
    cand = backprop.parse_candidate("dense=add(g, noise); conv=mul(g, bn_y)")
    s.fitness.parse(cand.gin_bindings(), str(tmp_path / "t"), 10)
    import gin

    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    assert model.conv_rule.text() == "mul(g, bn_y)" and model.model.model_name == "tiny/s"
    assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == backprop.HOLDOUT_TASK


def test_the_compare_gin_parses_every_arm(tmp_path, clean_gin):
    import gin

    from moetx.search import fitness

    gin_files.parse_files(["search/backprop_compare.gin"], [f"OUTPUT_DIR = '{tmp_path}'"])
    cfg = {k: gin.query_parameter(f"compare.{k}") for k in ("gin_files", "arms", "bindings")}
    assert list(cfg["arms"])[0] == "backprop" and gin.query_parameter("compare.seeds") == (
        0, 1, 2)
    base = fitness.TrainingFitness(gin_files=cfg["gin_files"], bindings=tuple(cfg["bindings"]),
                                   train_steps=1, compilation_cache=False)
    for arm, bindings in cfg["arms"].items():
        base.parse(list(bindings), str(tmp_path / arm), 1)
        assert isinstance(gin.query_parameter("%MODEL").scoped_configurable_fn(),
                          backprop.BackwardRuleModel)


def test_the_holdout_task_splits_the_training_set():
    from moetx.vision import data

    backprop.register_holdout_task()
    train = backprop.holdout_split("train")
    val = backprop.holdout_split("validation")
    assert len(train["image"]) == 50_000 and len(val["image"]) == 10_000
    full, _ = data.load_fashion_mnist("train")
    assert np.array_equal(val["image"], full[-10_000:])


# ---------------------------------------------------------------------- a search end to end
TINY_BINDINGS = (
    "import moetx.search.backprop", f"MIXTURE_OR_TASK_NAME = '{backprop.HOLDOUT_TASK}'",
    "EVAL_SPLIT = 'validation'", "EVAL_STEPS = 1", "MODEL_NAME = 'tiny/s'",
    "MODEL = @BackwardRuleModel()", "BackwardRuleModel.model = @ImageClassificationModel()",
    "BATCH_SIZE = 8", "EMA_DECAY = None", "ImageClassificationModel.augment = None",
    "WARMUP_STEPS = 1", "warmup_cosine_schedule.decay_steps = 4", "LOG_EVERY = 100",
    "SAVE_EVERY = 100000")


def _tiny_search(search_dir: str, cache_from: str | None = None) -> list[dict]:
    fit = backprop.AccuracyFitness(gin_files=("vision/fashion_mnist.gin",),
                                   bindings=TINY_BINDINGS, train_steps=2, hurdle_fraction=0.5)
    # mul(g, one) is plain backprop; each mutation of one decision computes something else.
    space = backprop.backprop_space(operands=("g", "y", "one"), unaries=("identity", "neg"),
                                    binaries=("add", "mul"))
    if cache_from:  # the compiled programs of an identical search: only saves time
        os.makedirs(search_dir)
        os.symlink(os.path.join(cache_from, "jax_cache"), os.path.join(search_dir, "jax_cache"))
    evolution.Search(search_dir=search_dir, space=space, fitness=fit, num_trials=3,
                     population_size=2, tournament_size=2, hurdle_min_trials=1, seed=4,
                     seeds=["dense=mul(g, one); conv=mul(g, one)"],
                     seed_encoder=backprop.encode_backprop, seed_mutations=1, verbose=False,
                     plot=False).run()
    return evolution.trials(search_dir)


def test_a_search_of_training_runs_runs_end_to_end_is_deterministic_and_resumes(tmp_path):
    first = _tiny_search(str(tmp_path / "a"))
    assert [r["id"] for r in first] == [0, 1, 2]
    assert first[0]["text"] == "dense=mul(g, one); conv=mul(g, one)"
    assert first[0]["status"] == "done" and first[0]["hurdle_threshold"] is None
    assert 0.0 <= first[0]["reward"] <= 1.0
    assert first[0]["reward"] == first[0]["metrics"]["accuracy"]
    trained = [r for r in first if r["status"] in ("done", "hurdle")]
    assert len(trained) >= 2
    # A later trial met the first one's early accuracy as its hurdle.
    later = trained[1]
    assert later["hurdle_threshold"] == first[0]["hurdle_reward"]
    assert later["status"] == ("hurdle" if later["hurdle_reward"] < first[0]["hurdle_reward"]
                               else "done")
    trial_dir = tmp_path / "a" / "trials" / "00000"
    assert "BackwardRuleModel.conv_rule = 'mul(g, one)'" in (trial_dir / "config.gin").read_text()
    summary = json.load(open(os.path.join(tmp_path, "a", "summary.json")))
    assert summary["finished"] == 3
    second = _tiny_search(str(tmp_path / "b"), cache_from=str(tmp_path / "a"))
    keys = ("dna", "text", "status", "reward", "hurdle_reward", "fingerprint", "reason")
    assert [{k: r[k] for k in keys} for r in first] == [{k: r[k] for k in keys} for r in second]
    # Killed during its last trial (the log cut after two trials, with a torn line), then the
    # same command again: only the last trial runs, and the search is the same.
    log = os.path.join(tmp_path, "b", evolution.TRIAL_LOG)
    lines = open(log).read().splitlines(keepends=True)
    with open(log, "w") as f:
        f.writelines(lines[:2])
        f.write('{"id": 2, "dna": [')
    resumed = _tiny_search(str(tmp_path / "b"))
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in first]
    assert [r["time"] for r in resumed[:2]] == [r["time"] for r in second[:2]]
