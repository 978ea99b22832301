"""Helpers shared by the language-model tests."""

import jax
import jax.numpy as jnp
import numpy as np


def assert_cached_decoding_matches_teacher_forcing(m, params, seed: int = 3) -> None:
    """Feeding a sequence one token at a time through the cache gives the logits of the full
    teacher-forced forward pass at every position (shared by the Primer/RoPE tests)."""
    t = jnp.asarray(np.random.RandomState(seed).randint(3, 64, (2, 16)), jnp.int32)
    inp = jnp.concatenate([jnp.zeros_like(t[:, :1]), t[:, :-1]], axis=1)
    full = m.logits(params, {"decoder_input_tokens": inp, "decoder_target_tokens": t})
    cache = m.init_cache(params, 2, 16)
    step = jax.jit(m.decode_step)
    got = []
    for i in range(16):
        lg, cache = step(params, inp[:, i:i + 1], jnp.int32(i), cache)
        got.append(lg)
    # float32, two summation orders (one token at a time against the whole sequence): logits
    # of up to ~6 have differed by up to 1.9e-5 (on a CPU without AVX-512), where a wrong cache
    # is off by ~0.1.
    np.testing.assert_allclose(jnp.stack(got, 1), full, rtol=1e-5, atol=1e-4)
