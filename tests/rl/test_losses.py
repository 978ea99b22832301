"""The loss language: reference programs equal their formulas on a fixed tiny batch, the array
interpreter equals the op-by-op evaluation, fingerprints identify functions, and ill-typed graphs
are rejected with the reason."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.rl import losses

GAMMA = 0.9


def tiny_batch():
    """Three transitions over two actions; the last one terminal (discount 0)."""
    return {"q_tm1": jnp.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]]),
            "a_tm1": jnp.array([1, 0, 0], jnp.int32),
            "r_t": jnp.array([1.0, 0.0, -1.0]),
            "discount": jnp.array([GAMMA, GAMMA, 0.0]),
            "qtarg_t": jnp.array([[0.0, 4.0], [2.0, 1.0], [5.0, 5.0]]),
            "q_t": jnp.array([[3.0, 1.0], [0.0, 2.0], [1.0, 0.0]])}


def td_error(b):
    """delta = Q(s,a) - (r + gamma * max_a' Q_targ(s', a')), written out by hand."""
    q_sa = np.array([2.0, 0.5, 3.0])
    target = np.array([1.0 + GAMMA * 4.0, 0.0 + GAMMA * 2.0, -1.0 + 0.0])
    return q_sa, q_sa - target


def run_both(name, batch):
    prog = losses.program(name)
    arrays = {k: jnp.asarray(v) for k, v in losses.program_arrays(prog).items()}
    return np.asarray(losses.evaluate(prog, batch)), np.asarray(
        jax.jit(losses.interpret)(arrays, batch))


def test_dqn_is_half_the_squared_td_error():
    q_sa, delta = td_error(tiny_batch())
    for out in run_both("dqn", tiny_batch()):
        np.testing.assert_allclose(out, 0.5 * delta ** 2, rtol=1e-6)


def test_dqn_reg_adds_a_tenth_of_q():
    q_sa, delta = td_error(tiny_batch())
    for out in run_both("dqn_reg", tiny_batch()):
        np.testing.assert_allclose(out, 0.5 * delta ** 2 + 0.1 * q_sa, rtol=1e-6)


def test_double_dqn_cql_and_dqn_clipped_follow_their_formulas():
    b = tiny_batch()
    q_sa = np.array([2.0, 0.5, 3.0])
    # Double DQN: the target network scores the online greedy action at s'.
    a_star = np.argmax(np.asarray(b["q_t"]), -1)
    y = np.asarray(b["r_t"]) + np.asarray(b["discount"]) * np.asarray(b["qtarg_t"])[
        np.arange(3), a_star]
    for out in run_both("double_dqn", b):
        np.testing.assert_allclose(out, 0.5 * (q_sa - y) ** 2, rtol=1e-6)
    _, delta = td_error(b)
    lse = np.log(np.exp(np.asarray(b["q_tm1"])).sum(-1))
    for out in run_both("cql", b):
        np.testing.assert_allclose(out, 0.5 * delta ** 2 + lse - q_sa, rtol=1e-5)
    y = q_sa - delta
    max_targ = np.asarray(b["qtarg_t"]).max(-1)
    want = np.maximum(q_sa, 0.5 * delta ** 2 + y) + np.maximum(
        q_sa - y, np.asarray(b["discount"]) * max_targ ** 2)
    for out in run_both("dqn_clipped", b):
        np.testing.assert_allclose(out, want, rtol=1e-6)


def test_interpreter_equals_evaluation_with_gradients():
    """The lax.switch interpreter (what the agent runs, compiled once for every program) equals
    the typed evaluation, values and gradients w.r.t. Q(s_t), on the random probe inputs."""
    inputs = losses.probe_inputs()

    def value_and_grad(evaluate):
        return jax.value_and_grad(lambda q: jnp.sum(evaluate({**inputs, "q_tm1": q})))(
            inputs["q_tm1"])

    interpreted = jax.jit(lambda arrays: value_and_grad(lambda i: losses.interpret(arrays, i)))
    for name in sorted(losses.PROGRAMS):
        prog = losses.program(name)
        arrays = {k: jnp.asarray(v) for k, v in losses.program_arrays(prog).items()}
        got, want = interpreted(arrays), value_and_grad(lambda i: losses.evaluate(prog, i))
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_programs_round_trip_through_text():
    for name, text in losses.PROGRAMS.items():
        assert losses.parse(text).text() == text


def test_identical_programs_hash_equal_and_different_ones_do_not():
    fp = {name: losses.fingerprint(losses.program(name)) for name in losses.PROGRAMS}
    assert len(set(fp.values())) == len(fp)
    # The same loss written differently: a dead node and swapped commutative arguments.
    rewritten = losses.parse(
        "v0 = softmax(q_t); v1 = max_list(qtarg_t); v2 = mul(v1, discount); v3 = add(v2, r_t); "
        "v4 = select(q_tm1, a_tm1); v5 = l2dist(v4, v3)")
    assert losses.fingerprint(rewritten) == fp["dqn"]
    assert losses.fingerprint(losses.program("dqn")) == fp["dqn"]


@pytest.mark.parametrize("text, reason", [
    ("v0 = add(q_tm1, a_tm1)", r"arguments of types \(LIST, ACTION\) but add takes"),
    ("v0 = select(q_tm1, r_t)", r"select takes \(LIST, ACTION\) or \(PROB, ACTION\)"),
    ("v0 = max_list(q_tm1); v1 = softmax(v0)", r"node v1 = softmax.*\(FLOAT\)"),
    ("v0 = softmax(q_tm1)", "the last node .* must be a FLOAT .* found PROB"),
    ("v0 = max_list(qtarg_t); v1 = add(r_t, v0)", "does not depend differentiably on q_tm1"),
    ("v0 = argmax(q_tm1); v1 = select(qtarg_t, v0)", "does not depend differentiably"),
    ("v0 = frobnicate(q_tm1)", "unknown op 'frobnicate'"),
    ("v0 = abs(q_tm1, r_t)", "takes 1 argument"),
])
def test_ill_typed_graphs_are_rejected_with_the_reason(text, reason):
    with pytest.raises(losses.LossTypeError, match=reason):
        losses.parse(text).check()


def test_forward_references_are_rejected():
    prog = losses.LossProgram((losses.Node("max_list", (7,)), losses.Node("abs", (6,))))
    with pytest.raises(losses.LossTypeError, match="reads register 7"):
        prog.check()
