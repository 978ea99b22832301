"""Autoregressive decoding with a KV cache: greedy and temperature / top-k sampling.

Decoder-only convention (T5X): position 0 is fed token 0 (BOS), position i is fed the token at
i - 1. Prompt positions are *forced*: while i is inside a row's prompt, the "sampled" token is the
prompt token, so every row advances in lockstep through one compiled loop and the cache holds
exactly what a teacher-forced forward pass would compute.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

# (tokens [batch, 1], position [], cache) -> (logits [batch, vocab], new cache)
StepFn = Callable[[Array, Array, dict], tuple[Array, dict]]


def sample_logits(rng: Array, logits: Array, temperature: float, topk: int) -> Array:
    """Draws one token id per row.

    Args:
      rng: PRNG key.
      logits: <float32>[batch, vocab].
      temperature: 0 selects the argmax (greedy); otherwise logits are divided by it.
      topk: if > 0, sample only among the `topk` largest logits.
    Returns:
      <int32>[batch] token ids.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    logits = logits / temperature
    if topk > 0:
        kth = jax.lax.top_k(logits, topk)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def temperature_sample(
    step_fn: StepFn,
    cache: dict,
    prompts: Array,
    prompt_lengths: Array,
    rng: Array,
    eos_id: int,
    temperature: float = 0.0,
    topk: int = 0,
) -> Array:
    """Decodes until every row has emitted EOS after its prompt or the buffer is full.

    Args:
      step_fn: one cached decoder step.
      cache: the initialised KV cache for `prompts.shape[1]` positions.
      prompts: <int32>[batch, max_length], each row's prompt left-aligned, zero padded.
      prompt_lengths: <int32>[batch] number of prompt tokens in each row.
      rng: PRNG key for sampling.
      eos_id: the end-of-sequence id; generated positions after it are set to 0.
    Returns:
      <int32>[batch, max_length]: prompt followed by the generated tokens (then zeros).
    """
    batch, max_length = prompts.shape

    def cond(state):
        i, _, _, ended, _ = state
        return (i < max_length) & ~jnp.all(ended)

    def body(state):
        i, tokens, cache, ended, rng = state
        rng, step_rng = jax.random.split(rng)
        prev = jnp.where(i == 0, 0, jax.lax.dynamic_index_in_dim(tokens, i - 1, 1, False))
        logits, cache = step_fn(prev[:, None], i, cache)
        sampled = sample_logits(step_rng, logits, temperature, topk)
        in_prompt = i < prompt_lengths
        prompt_tok = jax.lax.dynamic_index_in_dim(prompts, i, 1, False)
        tok = jnp.where(in_prompt, prompt_tok, jnp.where(ended, 0, sampled))
        ended = ended | (~in_prompt & (tok == eos_id))
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, tok, i, 1)
        return i + 1, tokens, cache, ended, rng

    init = (jnp.array(0, jnp.int32), jnp.zeros_like(prompts), cache,
            jnp.zeros((batch,), bool), rng)
    _, tokens, _, _, _ = jax.lax.while_loop(cond, body, init)
    return tokens
