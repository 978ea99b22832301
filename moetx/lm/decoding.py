"""Autoregressive decoding with a KV cache: greedy, temperature/top-k/top-p sampling, beam search.

Decoder-only convention (T5X): position 0 is fed token 0 (BOS), position i is fed the token at
i - 1. Prompt positions are *forced*: while i is inside a row's prompt, the "sampled" token is the
prompt token, so every row advances in lockstep through one compiled loop and the cache holds
exactly what a teacher-forced forward pass would compute.

Every decoder here is one `jax.lax.while_loop` over positions calling a `StepFn`, so it jits as a
whole (close over the parameters in `step_fn`; pass Python numbers for the decoding options).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from moetx.lm import scan

Array = jax.Array
PyTree = Any

# (tokens [batch, 1], position [], cache) -> (logits [batch, vocab], new cache)
StepFn = Callable[[Array, Array, PyTree], tuple[Array, PyTree]]


# ------------------------------------------------------------------------------------ sampling
def _topk_mask(logits: Array, topk: int) -> Array:
    """Sets every logit below the row's `topk`-th largest to -inf (ties with it are kept)."""
    kth = jax.lax.top_k(logits, topk)[0][:, -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _topp_mask(logits: Array, topp: float) -> Array:
    """Keeps the nucleus: the smallest set of most likely tokens whose probability is >= `topp`.

    Args:
      logits: <float32>[batch, vocab], already divided by the temperature.
      topp: in (0, 1).
    Returns:
      <float32>[batch, vocab] with the logits outside the nucleus set to -inf.
    """
    # Shape: [batch, vocab], each row by decreasing logit.
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token is in the nucleus while the tokens ranked above it hold less than `topp`: that is
    # the smallest set reaching `topp`, and the top token (nothing above it) is always in it.
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_above < topp
    # Masking by value rather than scattering the sorted mask back: tokens tied with the last
    # kept logit stay in, which only matters on exact ties.
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_logits(rng: Array, logits: Array, temperature: float, topk: int,
                  topp: float = 0.0) -> Array:
    """Draws one token id per row.

    Args:
      rng: PRNG key.
      logits: <float32>[batch, vocab].
      temperature: 0 selects the argmax (greedy, whatever topk/topp); otherwise logits are
        divided by it.
      topk: if > 0, sample only among the `topk` largest logits.
      topp: if > 0, sample only from the nucleus, the smallest set of most likely tokens whose
        probability (after the temperature) is at least `topp`; 1.0 keeps every token. At most
        one of `topk` and `topp` may be non-zero (as in T5X).
    Returns:
      <int32>[batch] token ids.
    """
    if topk > 0 and topp > 0.0:
        raise ValueError(f"At most one of topk and topp may be non-zero, got topk={topk} and "
                         f"topp={topp}; set the other to 0.")
    if not 0.0 <= topp <= 1.0:
        raise ValueError(f"topp must be in [0, 1], got {topp}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if topk > 0:
        logits = _topk_mask(logits, topk)
    # topp == 1 keeps everything; skipping it avoids dropping the tail to float32 rounding of
    # the cumulative sum.
    elif 0.0 < topp < 1.0:
        logits = _topp_mask(logits, topp)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def temperature_sample(
    step_fn: StepFn,
    cache: PyTree,
    prompts: Array,
    prompt_lengths: Array,
    rng: Array,
    eos_id: int,
    temperature: float = 0.0,
    topk: int = 0,
    topp: float = 0.0,
) -> Array:
    """Decodes until every row has emitted EOS after its prompt or the buffer is full.

    Args:
      step_fn: one cached decoder step.
      cache: the initialised KV cache for `prompts.shape[1]` positions.
      prompts: <int32>[batch, max_length], each row's prompt left-aligned, zero padded.
      prompt_lengths: <int32>[batch] number of prompt tokens in each row.
      rng: PRNG key for sampling.
      eos_id: the end-of-sequence id; generated positions after it are set to 0.
      temperature, topk, topp: see `sample_logits`.
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
        sampled = sample_logits(step_rng, logits, temperature, topk, topp)
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


# ------------------------------------------------------------------------------- beam helpers
def length_penalty(num_generated: Array, alpha: float) -> Array:
    """T5X's (GNMT's) length penalty `((5 + length) / 6) ** alpha`; a finished hypothesis scores
    its summed log-probability divided by it, so alpha > 0 favours longer outputs, 0 is neutral.

    Args:
      num_generated: <int32>[...] generated tokens, EOS included (the prompt is not counted).
    Returns:
      <float32>[...] the divisor.
    """
    return ((5.0 + num_generated.astype(jnp.float32)) / 6.0) ** alpha


def _batch_axis(path: tuple) -> int:
    """The batch axis of a cache leaf: 1 under a scanned stack (`moetx.lm.scan`: its leaves
    carry the layer axis first), else 0."""
    return 1 if any(getattr(k, "key", None) == scan.SCANNED for k in path) else 0


def _map_batch(fn: Callable[[Array, int], Array], tree: PyTree) -> PyTree:
    """`fn(leaf, batch axis)` on every leaf that has a batch axis; leaves without one (the
    scalar `cache_index`, or its [layers] vector when scanned) are left alone."""
    def one(path, x):
        axis = _batch_axis(path)
        return x if jnp.ndim(x) <= axis else fn(x, axis)
    return jax.tree_util.tree_map_with_path(one, tree)


def expand_cache(cache: PyTree, num_beams: int) -> PyTree:
    """Repeats each example's cache `num_beams` times along the batch axis.

    Array leaves <T>[batch, ...] become <T>[batch * num_beams, ...], row `b * num_beams + k`
    holding beam k of example b; under a scanned stack (`moetx.lm.scan`) the leaves are
    <T>[layers, batch, ...] and the batch axis is the second. Scalar leaves (`cache_index`, a
    [layers] vector when scanned) are shared by every row, since all beams advance in lockstep,
    and are left alone.
    """
    return _map_batch(lambda x, axis: jnp.repeat(x, num_beams, axis=axis), cache)


def gather_beams(tree: PyTree, beam_indices: Array, batch: int, num_beams: int) -> PyTree:
    """Reorders the beams of every example: new beam k of example b is old beam
    `beam_indices[b, k]` of the same example.

    Args:
      tree: pytree of <T>[batch * num_beams, ...] arrays (laid out as by `expand_cache`, the
        batch axis second under a scanned stack); scalar leaves are left alone.
      beam_indices: <int32>[batch, num_beams] in [0, num_beams).
    Returns:
      The pytree with the same shapes, rows gathered.
    """
    # Shape: [batch, num_beams] -> [batch * num_beams] rows of the flattened batch * beam axis.
    rows = (jnp.arange(batch, dtype=jnp.int32)[:, None] * num_beams + beam_indices).reshape(-1)
    return _map_batch(lambda x, axis: jnp.take(x, rows, axis=axis), tree)


def _take_beams(x: Array, indices: Array) -> Array:
    """x: <T>[batch, beams, ...], indices: <int32>[batch, k] -> <T>[batch, k, ...]."""
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


# -------------------------------------------------------------------------------- beam search
class BeamState(NamedTuple):
    """The loop state of `beam_search` (a pytree carried by `jax.lax.while_loop`).

    Attributes:
      position: <int32>[] the position the next step fills; it is fed the token at position - 1.
      live_seqs: <int32>[batch, num_beams, max_length] unfinished hypotheses, prompt included,
        zeros from `position` on.
      live_logprobs: <float32>[batch, num_beams] summed log-probabilities of their generated
        tokens (the prompt costs nothing), best first; -inf marks an empty slot.
      finished_seqs: <int32>[batch, num_beams, max_length] hypotheses ended by EOS or by the end
        of the buffer, zeros after their last token.
      finished_scores: <float32>[batch, num_beams] their length-penalised scores, best first;
        -inf in empty slots.
      finished_flags: <bool>[batch, num_beams] which finished slots hold a hypothesis.
      cache: the decoder cache, array leaves at batch * num_beams rows (see `expand_cache`),
        row-aligned with `live_seqs`.
    """

    position: Array
    live_seqs: Array
    live_logprobs: Array
    finished_seqs: Array
    finished_scores: Array
    finished_flags: Array
    cache: PyTree


def beam_search(
    step_fn: StepFn,
    cache: PyTree,
    prompts: Array,
    prompt_lengths: Array,
    eos_id: int,
    num_beams: int = 4,
    alpha: float = 0.6,
    max_decode_steps: int | None = None,
) -> tuple[Array, Array]:
    """Beam search continuation of left-aligned prompts (T5X semantics).

    Each step extends every live beam by every token, keeps the best `2 * num_beams`
    candidates of each example (so that `num_beams` remain live even if `num_beams` of them end),
    moves those ending in EOS to the finished set, scored by their log-probability divided by
    `length_penalty`, and keeps the best `num_beams` others live. A finished hypothesis stops
    growing. A row is done when its worst finished score beats the best score any live beam
    could still reach; the search stops when every row is done. A hypothesis still live when
    its row's buffer is full is scored as if it had finished there.

    Args:
      step_fn: one cached decoder step, called on `batch * num_beams` rows. Whatever it closes
        over with a batch axis (an encoder's output, say) must be laid out the same way:
        `expand_cache(x, num_beams)` does that for any pytree.
      cache: the initialised cache for `batch` rows and `prompts.shape[1]` positions (expanded
        here; see `expand_cache`).
      prompts: <int32>[batch, max_length], each row's prompt left-aligned, zero padded.
      prompt_lengths: <int32>[batch] number of prompt tokens in each row.
      eos_id: the end-of-sequence id (an id outside the vocabulary disables early stopping).
      num_beams: beams kept per example, and sequences returned per example.
      alpha: length-penalty exponent; 0 ranks by plain log-probability.
      max_decode_steps: if set, each row generates at most this many tokens after its prompt.
    Returns:
      sequences: <int32>[batch, num_beams, max_length], best first: the prompt, the generated
        tokens (EOS included), then zeros.
      scores: <float32>[batch, num_beams] their length-penalised log-probabilities, best first;
        -inf where fewer than `num_beams` hypotheses exist. A row that could generate nothing
        returns its prompt with score 0 in beam 0.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}.")
    if prompts.ndim != 2 or prompt_lengths.shape != prompts.shape[:1]:
        raise ValueError(f"Expected prompts [batch, max_length] and prompt_lengths [batch], got "
                         f"{prompts.shape} and {prompt_lengths.shape}.")
    if max_decode_steps is not None and max_decode_steps < 0:
        raise ValueError(f"max_decode_steps must be None or >= 0, got {max_decode_steps}.")
    batch, max_length = prompts.shape
    prompts = prompts.astype(jnp.int32)
    prompt_lengths = jnp.minimum(prompt_lengths.astype(jnp.int32), max_length)
    # Each row's last generated token sits at end - 1.
    end = jnp.full((batch,), max_length, jnp.int32)
    if max_decode_steps is not None:
        end = jnp.minimum(end, prompt_lengths + max_decode_steps)
    beam_ids = jnp.broadcast_to(jnp.arange(num_beams, dtype=jnp.int32), (batch, num_beams))

    def row_done(state: BeamState) -> Array:
        """<bool>[batch]: the row's finished set can no longer change."""
        i = state.position
        # A live beam's log-probability only decreases, and the penalty is monotone in the
        # length, so its best reachable score divides by the larger penalty of the shortest and
        # longest lengths it can still end with.
        shortest = jnp.maximum(i + 1 - prompt_lengths, 1)
        longest = jnp.maximum(end - prompt_lengths, 1)
        penalty = jnp.maximum(length_penalty(shortest, alpha), length_penalty(longest, alpha))
        best_live = jnp.max(state.live_logprobs, axis=1) / penalty
        worst_finished = jnp.min(
            jnp.where(state.finished_flags, state.finished_scores, jnp.inf), axis=1)
        full = jnp.all(state.finished_flags, axis=1)
        return (i >= end) | (full & (worst_finished > best_live))

    def cond(state: BeamState) -> Array:
        return (state.position < max_length) & ~jnp.all(row_done(state))

    def body(state: BeamState) -> BeamState:
        i = state.position
        # Shape: [batch, num_beams] -> [batch * num_beams, 1]
        prev = jnp.where(i == 0, 0, jax.lax.dynamic_index_in_dim(state.live_seqs, i - 1, 2, False))
        flat_logits, new_cache = step_fn(prev.reshape(batch * num_beams, 1), i, state.cache)
        vocab = flat_logits.shape[-1]
        if vocab < 2:
            raise ValueError(f"Beam search needs a vocabulary of >= 2 tokens, got {vocab}.")
        # Shape: [batch * num_beams, vocab] -> [batch, num_beams, vocab]
        logprobs = jax.nn.log_softmax(
            flat_logits.astype(jnp.float32).reshape(batch, num_beams, vocab), axis=-1)
        # Shape: [batch, num_beams * vocab]; entry k * vocab + t extends beam k by token t.
        extended = (state.live_logprobs[:, :, None] + logprobs).reshape(batch, num_beams * vocab)
        # Shape: [batch, 2 * num_beams] each; at most num_beams of them can be EOS (one per beam).
        cand_logprobs, cand_index = jax.lax.top_k(extended, 2 * num_beams)
        cand_beam = (cand_index // vocab).astype(jnp.int32)
        cand_token = (cand_index % vocab).astype(jnp.int32)
        # Shape: [batch, 2 * num_beams, max_length]
        cand_seqs = jax.lax.dynamic_update_index_in_dim(
            _take_beams(state.live_seqs, cand_beam), cand_token, i, 2)
        # Extensions of empty (-inf) slots are not hypotheses; they only fill top_k when there
        # are fewer than 2 * num_beams real candidates (a short prefix over a small vocabulary).
        real = cand_logprobs > -jnp.inf
        at_last = (i == end - 1)[:, None]
        ends = real & ((cand_token == eos_id) | at_last)

        # Live: the best num_beams candidates that go on.
        live_logprobs, pick = jax.lax.top_k(jnp.where(ends, -jnp.inf, cand_logprobs), num_beams)
        live_seqs = _take_beams(cand_seqs, pick)
        source_beam = jnp.take_along_axis(cand_beam, pick, axis=1)

        # Finished: the best num_beams of the old finished set and the newly ended candidates.
        num_generated = i + 1 - prompt_lengths
        ended_scores = jnp.where(
            ends, cand_logprobs / length_penalty(num_generated, alpha)[:, None], -jnp.inf)
        # Shape: [batch, 3 * num_beams, ...] -> [batch, num_beams, ...]
        finished_scores, pick = jax.lax.top_k(
            jnp.concatenate([state.finished_scores, ended_scores], axis=1), num_beams)
        finished_seqs = _take_beams(
            jnp.concatenate([state.finished_seqs, cand_seqs], axis=1), pick)
        finished_flags = _take_beams(
            jnp.concatenate([state.finished_flags, ends], axis=1), pick)

        # Rows inside their prompt force the prompt token into every beam without reordering
        # (the scores stay [0, -inf, ...], so only beam 0 expands when the prompt ends); rows
        # past their end keep their state.
        in_prompt = i < prompt_lengths
        generating = ~in_prompt & (i < end)
        prompt_token = jax.lax.dynamic_index_in_dim(prompts, i, 1, False)
        forced_seqs = jax.lax.dynamic_update_index_in_dim(
            state.live_seqs, jnp.broadcast_to(prompt_token[:, None], (batch, num_beams)), i, 2)
        g, p = generating[:, None], in_prompt[:, None]
        return BeamState(
            position=i + 1,
            live_seqs=jnp.where(g[..., None], live_seqs,
                                jnp.where(p[..., None], forced_seqs, state.live_seqs)),
            live_logprobs=jnp.where(g, live_logprobs, state.live_logprobs),
            finished_seqs=jnp.where(g[..., None], finished_seqs, state.finished_seqs),
            finished_scores=jnp.where(g, finished_scores, state.finished_scores),
            finished_flags=jnp.where(g, finished_flags, state.finished_flags),
            # Each new live beam carries the cache of the beam it extends.
            cache=gather_beams(new_cache, jnp.where(g, source_beam, beam_ids), batch, num_beams),
        )

    init = BeamState(
        position=jnp.array(0, jnp.int32),
        live_seqs=jnp.zeros((batch, num_beams, max_length), jnp.int32),
        # Only beam 0 is live at first: the beams are identical through the prompt, and beams
        # starting at 0 would all pick the same best token at the first real expansion.
        live_logprobs=jnp.tile(
            jnp.array([0.0] + [-jnp.inf] * (num_beams - 1), jnp.float32), (batch, 1)),
        finished_seqs=jnp.zeros((batch, num_beams, max_length), jnp.int32),
        finished_scores=jnp.full((batch, num_beams), -jnp.inf, jnp.float32),
        finished_flags=jnp.zeros((batch, num_beams), bool),
        cache=expand_cache(cache, num_beams),
    )
    final = jax.lax.while_loop(cond, body, init)
    # Only a row that generated nothing has no finished hypothesis: return its (prompt) beams.
    any_finished = jnp.any(final.finished_flags, axis=1)
    sequences = jnp.where(any_finished[:, None, None], final.finished_seqs, final.live_seqs)
    scores = jnp.where(any_finished[:, None], final.finished_scores, final.live_logprobs)
    return sequences, scores
