"""The Neural Optimizer Search language: its programs equal the hand-written optimizers step by
step, reproduce TensorFlow's PowerSign/AddSign trajectories, round-trip through text and DNA,
fingerprint by what they compute, and train a moetx model when selected by gin."""

import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyglove as pg
import pytest

from moetx.search import nos
from moetx.trainer import optimizers
from tests.conftest import make_trainer, packed_batch, tiny_model

LR = 0.1


def _params() -> dict:
    rng = np.random.RandomState(0)
    return {"a": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)}


def _grads(steps: int = 7) -> list[dict]:
    """Seeded gradients with a per-element drift whose sign flips after step 3."""
    rng = np.random.RandomState(1)
    base = {k: rng.normal(size=v.shape) for k, v in _params().items()}
    return [{k: jnp.asarray((1.0 if t < 4 else -1.0) * (b + 0.7 * rng.normal(size=b.shape)),
                            jnp.float32) for k, b in base.items()} for t in range(steps)]


def _updates(tx: optax.GradientTransformation, steps: int = 7) -> list[dict]:
    params = _params()
    state = tx.init(params)
    out = []
    for g in _grads(steps):
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out


def _rule_tx(rule: str, **kw) -> optax.GradientTransformation:
    return nos.rule_optimizer(optimizers.constant_schedule(LR), rule=rule, **kw).tx


def _assert_same_updates(ours: list[dict], theirs: list[dict]) -> None:
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]),
                                          err_msg=f"step {step + 1}, leaf {k}")


# ------------------------------------------------------------------ parity with optax / moetx
PARITY = {
    "sgd": (nos.SGD, lambda: optax.sgd(LR)),
    "momentum (bias-corrected EMA)": (nos.MOMENTUM, lambda: optax.chain(
        optax.ema(0.9, debias=True), optax.scale(-LR))),
    "adam": (nos.ADAM, lambda: optax.adam(LR, eps=1e-8)),
    "adam written out": ("div(m, sqrt_abs(v))", lambda: optax.adam(LR, eps=1e-8)),
    # RMSProp with the paper's operand g / (sqrt(v-hat) + eps) is Adam without momentum.
    "rmsprop": (nos.RMSPROP, lambda: optax.chain(optax.scale_by_adam(b1=0.0, eps=1e-8),
                                                 optax.scale(-LR))),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_programs_equal_the_optax_optimizers_step_by_step(name):
    rule, reference = PARITY[name]
    _assert_same_updates(_updates(_rule_tx(rule)), _updates(reference()))


DECAYS = {"ld": optimizers.linear_sign_decay, "cd": optimizers.cosine_sign_decay,
          "rd": optimizers.restart_sign_decay}


@pytest.mark.parametrize("decay", [None, "ld", "cd", "rd"])
def test_powersign_and_addsign_programs_equal_the_moetx_optimizers(decay):
    constant = optimizers.constant_schedule(LR)
    sign_decay = DECAYS[decay](5) if decay else None
    suffix = f"_{decay.upper()}" if decay else ""
    for program, optimizer in (("POWERSIGN", optimizers.powersign),
                               ("ADDSIGN", optimizers.addsign)):
        ours = _updates(_rule_tx(getattr(nos, program + suffix), decay_steps=5))
        _assert_same_updates(ours, _updates(optimizer(constant, sign_decay=sign_decay).tx))


# TensorFlow's test recipe: p = [1, 2], g = [0.1, 0.1] for four steps then -g for three,
# lr 0.1, beta 0.9: the trajectory of p[0] after each step.
POWERSIGN_P0 = [0.972817, 0.945634, 0.918452, 0.891269, 0.894948, 0.898626, 0.925809]
ADDSIGN_P0 = [0.98, 0.96, 0.94, 0.92, 0.92, 0.92, 0.94]


def _tf_trajectory(rule: str, **kw) -> np.ndarray:
    tx = _rule_tx(rule, beta1=0.9, **kw)
    params = {"p": jnp.asarray([1.0, 2.0], jnp.float32)}
    state = tx.init(params)
    out = []
    for i in range(7):
        g = {"p": jnp.asarray([0.1, 0.1], jnp.float32) * (1.0 if i < 4 else -1.0)}
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(params["p"]))
    return np.stack(out)


def test_programs_reproduce_tensorflows_golden_trajectories():
    np.testing.assert_allclose(_tf_trajectory(nos.POWERSIGN)[:, 0], POWERSIGN_P0, atol=1e-6)
    np.testing.assert_allclose(_tf_trajectory(nos.ADDSIGN)[:, 0], ADDSIGN_P0, atol=1e-6)
    final = _tf_trajectory(nos.POWERSIGN_LD, decay_steps=10)[-1, 0]
    assert round(float(final), 4) == 0.9323


# --------------------------------------------------------------- operands and functions
def _directions(rule: str, steps: int = 3, **kw) -> list[np.ndarray]:
    """The rule's direction d for leaf 'b' (no learning rate) on the first steps."""
    tx = nos.parse_rule(rule).to_optax(**kw)
    params = _params()
    state = tx.init(params)
    out = []
    for g in _grads(steps):
        d, state = tx.update(g, state, params)
        out.append(np.asarray(d["b"], np.float64))
    return out


def _reference_operands(steps: int = 3) -> list[dict[str, np.ndarray]]:
    """Every deterministic operand for leaf 'b', in float64 numpy."""
    p = np.asarray(_params()["b"], np.float64)
    m = v = y = 0.0
    out = []
    for t, grads in enumerate(_grads(steps), start=1):
        g = np.asarray(grads["b"], np.float64)
        m, v, y = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g ** 2, 0.999 * y + 0.001 * g ** 3
        mh, vh, yh = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t), y / (1 - 0.999 ** t)
        f = (t - 1) / 4  # updates made so far over decay_steps 4
        ops = {"g": g, "g2": g ** 2, "g3": g ** 3, "m": mh, "v": vh, "y": yh,
               "sign_g": np.sign(g), "sign_m": np.sign(mh), "one": 1.0, "two": 2.0,
               "adam": mh / (np.sqrt(vh) + 1e-8), "rmsprop": g / (np.sqrt(vh) + 1e-8),
               "ld": 1 - f, "cd": 0.5 * (1 + math.cos(math.pi * f)),
               "rd": 0.5 * (1 + math.cos(math.pi * f))}
        ops.update({f"wd{k}": 10.0 ** -k * p for k in range(1, 5)})
        out.append({k: np.broadcast_to(val, g.shape) for k, val in ops.items()})
    return out


@pytest.mark.parametrize("operand", [o for o in nos.OPERANDS if o != "noise"])
def test_each_operand_follows_its_definition(operand):
    reference = _reference_operands()
    # keep_left(x, one): the direction is the operand itself; params are not updated here.
    tx = nos.parse_rule(f"keep_left({operand}, one)").to_optax(decay_steps=4)
    params = _params()
    state = tx.init(params)
    for t, g in enumerate(_grads(3)):
        d, state = tx.update(g, state, params)
        np.testing.assert_allclose(np.asarray(d["b"], np.float64), reference[t][operand],
                                   rtol=2e-5, atol=1e-7, err_msg=f"step {t + 1}")


UNARY_REF = {
    "identity": lambda x: x, "neg": lambda x: -x, "exp": np.exp,
    "log_abs": lambda x: np.log(np.abs(x)), "sqrt_abs": lambda x: np.sqrt(np.abs(x)),
    "clip3": lambda x: np.clip(x, -1e-3, 1e-3), "clip4": lambda x: np.clip(x, -1e-4, 1e-4),
    "clip5": lambda x: np.clip(x, -1e-5, 1e-5), "sign": np.sign,
}
BINARY_REF = {
    "add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
    "div": lambda x, y: x / (y + 1e-8), "pow": lambda x, y: x ** y, "keep_left": lambda x, y: x,
}


def test_unary_and_binary_functions_follow_their_definitions():
    g = [np.asarray(x["b"], np.float64) for x in _grads(2)]
    for name, ref in UNARY_REF.items():
        d = _directions(f"mul({name}(g), one)", steps=2)
        np.testing.assert_allclose(d[1], ref(g[1]), rtol=1e-5, atol=1e-9, err_msg=name)
    two = np.full_like(g[0], 2.0)
    for name, ref in BINARY_REF.items():
        d = _directions(f"{name}(g, two)", steps=2)
        np.testing.assert_allclose(d[1], ref(g[1], two), rtol=1e-5, err_msg=name)
        d = _directions(f"{name}(two, sqrt_abs(g))", steps=2)
        np.testing.assert_allclose(d[1], ref(two, np.sqrt(np.abs(g[1]))), rtol=1e-5,
                                   err_msg=name)


def test_noise_and_drop_are_seeded_and_unscaled():
    big = {"w": jnp.zeros((20000,), jnp.float32)}
    grads = {"w": jnp.linspace(0.5, 1.5, 20000, dtype=jnp.float32)}

    def run(rule, seed, steps=2):
        tx = nos.parse_rule(rule).to_optax(seed=seed)
        state = tx.init(big)
        out = []
        for _ in range(steps):
            d, state = tx.update(grads, state, big)
            out.append(np.asarray(d["w"]))
        return out, state

    (n1, n2), state = run("keep_left(noise, one)", 0)
    assert abs(n1.mean()) < 0.005 and abs(n1.std() - 0.1) < 0.003  # N(0, 0.01)
    assert not np.array_equal(n1, n2)  # fresh every step
    np.testing.assert_array_equal(run("keep_left(noise, one)", 0)[0][0], n1)
    assert not np.array_equal(run("keep_left(noise, one)", 1)[0][0], n1)
    assert state.key is not None and state.m is None and state.v is None

    (d1, _), _ = run("keep_left(drop30(g), one)", 0)
    kept = d1 != 0
    assert abs(kept.mean() - 0.7) < 0.015
    np.testing.assert_array_equal(d1[kept], np.asarray(grads["w"])[kept])  # not rescaled
    # Two drop nodes draw independent masks.
    (d2, _), _ = run("mul(drop50(g), drop50(one))", 0)
    assert abs((d2 != 0).mean() - 0.25) < 0.015


def test_state_holds_only_the_slots_the_rule_reads():
    params = _params()
    sgd = nos.parse_rule(nos.SGD).to_optax().init(params)
    assert sgd.m is None and sgd.v is None and sgd.y is None and sgd.key is None
    adam = nos.parse_rule(nos.ADAM).to_optax().init(params)
    assert adam.m is not None and adam.v is not None and adam.y is None and adam.key is None
    y = nos.parse_rule("mul(y, sign_m)").to_optax().init(params)
    assert y.m is not None and y.v is None and y.y is not None
    assert len(jax.tree_util.tree_leaves(sgd)) == 1  # the count


def test_bad_optimizer_settings_are_refused():
    with pytest.raises(ValueError, match="decay_steps"):
        nos.parse_rule(nos.POWERSIGN_LD).to_optax()
    with pytest.raises(ValueError, match="beta2"):
        nos.parse_rule(nos.ADAM).to_optax(beta2=1.0)
    with pytest.raises(ValueError, match="params"):
        tx = nos.parse_rule("add(g, wd2)").to_optax()
        tx.update(_grads(1)[0], tx.init(_params()))


# --------------------------------------------------------------------- text and DNA
def test_named_programs_round_trip_through_text():
    assert set(nos.NAMED_RULES.values()) >= {nos.SGD, nos.MOMENTUM, nos.ADAM, nos.RMSPROP,
                                             nos.POWERSIGN, nos.ADDSIGN, nos.POWERSIGN_LD,
                                             nos.ADDSIGN_RD}
    for text in nos.NAMED_RULES.values():
        rule = nos.parse_rule(text)
        assert rule.text() == text and str(rule) == text
        assert nos.parse_rule(rule.text()) == rule
    powersign = nos.parse_rule(nos.POWERSIGN)
    assert powersign == nos.Binary("mul", nos.Unary("exp", nos.Binary(
        "mul", nos.Unary("identity", "sign_g"), nos.Unary("identity", "sign_m"))),
        nos.Unary("identity", "g"))
    # Explicit identities and spacing are accepted and normalised away.
    explicit = nos.parse_rule(" mul( exp(mul(sign_g,identity(sign_m))) ,identity(g))")
    assert explicit == powersign and explicit.text() == nos.POWERSIGN
    assert nos.parse_rule("keep_left(identity(mul(g, one)), one)").text() == (
        "keep_left(mul(g, one), one)")


def test_depths_and_reachability_in_the_default_space():
    depths = {name: nos.parse_rule(t).depth() for name, t in nos.NAMED_RULES.items()}
    assert depths == {"sgd": 1, "momentum": 1, "adam": 1, "rmsprop": 1, "powersign": 2,
                      "addsign": 3, "powersign_ld": 3, "powersign_cd": 3, "powersign_rd": 3,
                      "addsign_ld": 4, "addsign_cd": 4, "addsign_rd": 4}
    space = nos.rule_space()
    template = pg.template(space)
    for name, text in nos.NAMED_RULES.items():
        rule = nos.parse_rule(text)
        if rule.depth() <= 3:
            dna = template.encode(rule)
            assert pg.materialize(space, dna) == rule, name
        else:
            with pytest.raises(Exception):
                template.encode(rule)
    deep = nos.rule_space(max_depth=4)
    rule = nos.parse_rule(nos.ADDSIGN_LD)
    assert pg.materialize(deep, pg.template(deep).encode(rule)) == rule


@pytest.mark.parametrize("max_depth, count", [(1, 200), (3, 30)])
def test_random_rules_round_trip_through_text_and_dna(max_depth, count):
    # (PyGlove's decode clones the whole template, ~0.1 s at depth 3: fewer draws there.)
    space = nos.rule_space(max_depth=max_depth)
    spec, template = pg.dna_spec(space), pg.template(space)
    rng = random.Random(max_depth)
    dna = pg.random_dna(spec, rng)
    assert pg.materialize(space, dna) == template.decode(dna)
    depths = set()
    for _ in range(count):
        dna = pg.random_dna(spec, rng)
        rule = template.decode(dna)
        assert nos.parse_rule(rule.text()) == rule
        assert nos.parse_rule(str(rule)).text() == rule.text()
        assert template.encode(rule) == dna
        depths.add(rule.depth())
    assert depths == ({1} if max_depth == 1 else {1, 2, 3})


def test_small_spaces_and_bad_spaces():
    space = nos.rule_space(max_depth=1, operands=["g", "one"], unaries=["identity", "neg"],
                           binaries=["mul"])
    texts = [rule.text() for rule in pg.iter(space)]
    assert pg.dna_spec(space).space_size == len(texts) == 16
    assert set(texts) == {f"mul({a}, {b})" for a in ("g", "one", "neg(g)", "neg(one)")
                     for b in ("g", "one", "neg(g)", "neg(one)")}
    with pytest.raises(ValueError, match="max_depth"):
        nos.rule_space(max_depth=0)
    with pytest.raises(ValueError, match="operands"):
        nos.rule_space(operands=[])
    with pytest.raises(ValueError, match="Unknown unaries"):
        nos.rule_space(unaries=["identity", "tanh"])


@pytest.mark.parametrize("text, message", [
    ("mul(g, foo)", "Unknown operand 'foo'"),
    ("mul(tanh(g), g)", "Unknown function 'tanh'"),
    ("mul(g)", "'mul' takes 2 arguments, got 1"),
    ("exp(g, m)", "'exp' takes 1 argument, got 2"),
    ("mul(g, one) g", "Trailing text"),
    ("mul(g, one))", "Trailing text"),
    ("mul(g, one", "Unexpected end"),
    ("mul(g; one)", "Unexpected character ';'"),
    ("g(one)", "Operand 'g' takes no arguments"),
    ("mul(exp, g)", "'exp' is a function"),
    ("exp(g)", "binary function at the top"),
    ("g", "binary function at the top"),
    ("mul(exp(neg(g)), g)", "must be an operand or a binary"),
    ("", "Empty"),
])
def test_parser_errors_are_clear(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        nos.parse_rule(text)


# ---------------------------------------------------------- candidate protocol
def test_fingerprint_depends_on_what_the_rule_computes():
    fp = lambda text: nos.parse_rule(text).fingerprint()  # noqa: E731
    assert fp("mul(g, one)") == fp("keep_left(g, two)") == fp(nos.SGD)
    assert fp(nos.ADAM) == fp("div(m, sqrt_abs(v))")
    assert fp(nos.ADDSIGN) == fp("add(g, mul(sign_m, sqrt_abs(g2)))")  # g + sign(m)|g|
    assert len({fp(nos.SGD), fp(nos.ADAM), fp(nos.MOMENTUM), fp(nos.POWERSIGN),
                fp(nos.ADDSIGN), fp(nos.POWERSIGN_LD), fp(nos.POWERSIGN_CD)}) == 7
    assert fp(nos.POWERSIGN) == fp(nos.POWERSIGN)  # deterministic
    assert len(fp("pow(g, m)")) == 40  # NaN-safe


@pytest.mark.parametrize("text, reason", [
    ("keep_left(one, g)", "does not depend on the gradient"),
    ("add(wd1, noise)", "does not depend on the gradient"),
    ("sub(g, g)", "same for different gradients"),
    ("mul(sign(g2), one)", "same for different gradients"),
    ("pow(g, m)", "not finite"),
])
def test_validate_rejects_rules_that_cannot_train(text, reason):
    with pytest.raises(ValueError, match=reason):
        nos.parse_rule(text).validate()


def test_validate_accepts_the_named_programs_and_refuses_a_space():
    for text in nos.NAMED_RULES.values():
        nos.parse_rule(text).validate()
    with pytest.raises(ValueError, match="choices"):
        nos.rule_space().validate()


def test_gin_bindings_carry_the_program_text():
    rule = nos.parse_rule(nos.POWERSIGN)
    assert rule.gin_bindings() == [
        "import moetx.search.nos", "make_optimizer.optimizer_fn = @rule_optimizer",
        "rule_optimizer.rule = 'mul(exp(mul(sign_g, sign_m)), g)'"]


@pytest.mark.usefixtures("clean_gin")
def test_a_rule_selected_by_gin_trains_a_sharded_model():
    import gin

    # PowerSign plus a small dropped-noise term scaled by the weights: m, the key and the
    # parameters all enter the state or the update.
    rule = nos.parse_rule("add(mul(exp(mul(sign_g, sign_m)), g), drop10(mul(noise, wd4)))")
    rule.validate()
    gin.parse_config(rule.gin_bindings() + ["make_optimizer.schedule = @constant_schedule()",
                                            "constant_schedule.learning_rate = 3e-3"])
    trainer = make_trainer(tiny_model(), mesh_shape=(2, 1, 4),
                           optimizer=lambda param_axes: optimizers.make_optimizer(
                               param_axes=param_axes))
    state = trainer.init_state()
    rule_state = state.opt_state[0]
    assert isinstance(rule_state, nos.RuleState) and rule_state.v is None
    kernel_m = jax.tree_util.tree_leaves(rule_state.m)[0]
    assert kernel_m.sharding.spec == jax.tree_util.tree_leaves(state.params)[0].sharding.spec
    batch = trainer.to_global(packed_batch(8, 32, seed=1))
    losses = []
    for _ in range(2):
        state, sums = trainer.train_step(state, batch)
        losses.append(float(sums["loss"]))
    assert all(np.isfinite(losses)) and losses[1] != losses[0]
    assert int(state.opt_state[0].count) == 2
