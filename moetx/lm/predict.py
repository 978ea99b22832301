"""In-process prediction with a language model: encode, decode, generate and score.

A `Predictor` holds a decoder-only or encoder-decoder wrapper (`moetx.lm.models`), its
parameters (restored onto a mesh), the vocabulary, the mesh and the logical axis rules:

    predictor = Predictor.from_checkpoint(model, "runs/demo", max_length=64)
    [g.text for g in predictor.generate(["The king said"], temperature=0.8, topk=40)]
    predictor.score(["The king said."])                 # log p(text + EOS)
    t5.score(["translate: hello"], ["bonjour"])         # encoder-decoder: log p(targets | inputs)

Strings or token ids go in (strings are encoded with the vocabulary). Work is done in batches of
exactly `batch_size` rows (the last one padded), each row padded to the fixed lengths below, so
each jitted function compiles once per shape and decoding options:

* decoder-only: `max_length` bounds prompt + continuation (so a prompt has at most
  `max_length - 1` tokens); a scored text plus EOS has at most `max_length` tokens.
* encoder-decoder: the inputs plus EOS have at most `max_input_length` tokens; up to
  `max_length` target tokens are decoded, and a scored target plus EOS has at most `max_length`.

Sampling is reproducible: the batch starting at example `i` draws from
`fold_in(PRNGKey(seed), i)`. `moetx.lm.infer.infer` (files in, JSONL out), FLAN evaluation and
STraTA all predict through this class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moetx.trainer import checkpoints, partitioning

#: A prompt, input or target: a string (encoded with the vocabulary) or its token ids.
Text = str | Sequence[int]
#: progress(done, total): called after each batch.
Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generated continuation.

    Attributes:
      ids: the generated token ids up to (not including) the first EOS, padding ids removed.
      text: `ids` decoded.
      tokens: the raw decoded row: for an encoder-decoder the `max_length` target positions
        (EOS, then zeros); for a decoder-only model the positions after the prompt.
    """

    ids: list[int]
    text: str
    tokens: np.ndarray


class Predictor:
    """Encode, decode, generate and score with one language model on one mesh.

    Args:
      model: a `DecoderOnlyModel` or `EncoderDecoderModel` (anything with `predict_batch`,
        `score_batch` and `is_encoder_decoder`).
      params: its parameters (e.g. from `checkpoints.restore_for_model`).
      vocabulary: a SeqIO vocabulary (`encode`, `decode`, `eos_id`).
      mesh, rules: the device mesh the parameters live on and the logical axis rules.
      batch_size: rows per jitted call.
      max_length, max_input_length: the fixed lengths (module docstring); `generate` and
        `score` may override `max_length` per call.
      step: the checkpoint step the parameters come from (None when not from a checkpoint).
    """

    def __init__(self, model: Any, params: Any, vocabulary: Any, mesh: jax.sharding.Mesh,
                 rules: partitioning.LogicalRules, *, batch_size: int = 8,
                 max_length: int = 64, max_input_length: int = 128, step: int | None = None):
        for name, value in (("batch_size", batch_size), ("max_length", max_length),
                            ("max_input_length", max_input_length)):
            if int(value) <= 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        self.model = model
        self.params = params
        self.vocabulary = vocabulary
        self.mesh = mesh
        self.rules = tuple(rules)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.max_input_length = int(max_input_length)
        self.step = step
        self.is_encoder_decoder = bool(getattr(model, "is_encoder_decoder", False))
        self.eos_id = int(vocabulary.eos_id)
        static = ("eos_id", "temperature", "topk", "topp", "num_beams", "alpha") + (
            ("max_decode_length",) if self.is_encoder_decoder else ())
        self._predict = jax.jit(model.predict_batch, static_argnames=static)
        self._score = jax.jit(model.score_batch)

    @classmethod
    def from_checkpoint(cls, model: Any, checkpoint: str, *, step: int | None = None,
                        vocabulary: Any = None, vocabulary_path: str | None = None,
                        vocabulary_extra_ids: int = 0, batch_size: int = 8,
                        max_length: int = 64, max_input_length: int = 128,
                        mesh: jax.sharding.Mesh | None = None,
                        rules: partitioning.LogicalRules | None = None,
                        use_ema: bool = False) -> Predictor:
        """A Predictor with the parameters of a checkpoint of `model`.

        Args:
          checkpoint: a model directory (its newest checkpoint, or `step`) or a
            `checkpoint_<step>` directory.
          vocabulary: the vocabulary to use; default `vocabulary_path` (None: the bundled 8k
            SentencePiece model) with `vocabulary_extra_ids` sentinels (100 for
            span-corruption models).
          mesh, rules: default gin's `make_mesh()` and `standard_logical_axis_rules()`.
          use_ema: the EMA of the weights the run kept (train.ema_decay).
          Others: see the class.
        """
        if vocabulary is None:
            from moetx.datasets import vocab as vocab_lib

            vocabulary = vocab_lib.get_vocabulary(vocabulary_path,
                                                  extra_ids=vocabulary_extra_ids)
        mesh = partitioning.make_mesh() if mesh is None else mesh
        rules = tuple(partitioning.standard_logical_axis_rules() if rules is None else rules)
        lengths = ({"inputs": max_input_length, "targets": max_length}
                   if getattr(model, "is_encoder_decoder", False) else max_length)
        params, _, step = checkpoints.restore_for_model(
            model, checkpoint, mesh=mesh, rules=rules,
            input_shapes=model.input_shapes(batch_size, lengths), step=step, use_ema=use_ema)
        return cls(model, params, vocabulary, mesh, rules, batch_size=batch_size,
                   max_length=max_length, max_input_length=max_input_length, step=step)

    # ------------------------------------------------------------------------------ text
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each string (no EOS)."""
        return [[int(t) for t in self.vocabulary.encode(x)] for x in texts]

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """The string of each row of token ids."""
        return [self.vocabulary.decode([int(t) for t in row]) for row in ids]

    def _ids(self, items: Sequence[Text], what: str) -> list[list[int]]:
        if isinstance(items, str):
            raise TypeError(f"Expected a sequence of {what}s (strings or token-id lists), got "
                            f"one string; wrap it in a list.")
        out = []
        for x in items:
            if isinstance(x, str):
                out.append([int(t) for t in self.vocabulary.encode(x)])
            else:
                out.append([int(t) for t in np.asarray(x).reshape(-1)])
        return out

    # ------------------------------------------------------------------------------ generate
    def generate(self, prompts: Sequence[Text], *, max_length: int | None = None,
                 temperature: float = 0.0, topk: int = 0, topp: float = 0.0,
                 num_beams: int = 0, alpha: float = 0.6, seed: int = 0, add_eos: bool = True,
                 progress: Progress | None = None) -> list[Generation]:
        """Greedy (temperature 0), sampled (top-k / top-p at `temperature`) or beam-search
        (`num_beams` > 0, T5X length penalty `alpha`) continuation of each prompt, with the KV
        cache.

        Args:
          prompts: strings or token ids. An encoder-decoder reads each as its encoder input,
            with EOS appended when `add_eos` (pass False for ids that already end in EOS).
          max_length: overrides the Predictor's `max_length` for this call.
        Returns:
          One `Generation` per prompt, in order.
        """
        length = self.max_length if max_length is None else int(max_length)
        rows = self._ids(prompts, "prompt")
        if self.is_encoder_decoder:
            rows = [x + [self.eos_id] if add_eos else x for x in rows]
            _check_lengths(rows, self.max_input_length, "input",
                           "max_input_length (gin MAX_INPUT_LENGTH)")
        else:
            if length < 2:
                raise ValueError(f"max_length must leave room for a prompt token and a "
                                 f"generated one, got {length}.")
            _check_lengths(rows, length - 1, "prompt",
                           "max_length (gin MAX_LENGTH), which bounds prompt + continuation,")
        kw = dict(eos_id=self.eos_id, temperature=float(temperature), topk=int(topk),
                  topp=float(topp), num_beams=int(num_beams), alpha=float(alpha))
        out: list[Generation] = []
        with partitioning.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                rng = jax.random.fold_in(jax.random.PRNGKey(seed), start)
                if self.is_encoder_decoder:
                    enc = jnp.asarray(_pad(chunk, self.batch_size, self.max_input_length))
                    tokens = np.asarray(self._predict(self.params, enc, rng=rng,
                                                      max_decode_length=length, **kw))
                    generated = [tokens[i] for i in range(len(chunk))]
                else:
                    arr = np.concatenate([_pad(chunk, self.batch_size, length - 1),
                                          np.zeros((self.batch_size, 1), np.int32)], 1)
                    plen = np.array([len(x) for x in chunk]
                                    + [0] * (self.batch_size - len(chunk)), np.int32)
                    tokens = np.asarray(self._predict(self.params, jnp.asarray(arr),
                                                      jnp.asarray(plen), rng, **kw))
                    generated = [tokens[i, plen[i]:] for i in range(len(chunk))]
                for row in generated:
                    ids = _until_eos(row, self.eos_id)
                    out.append(Generation(ids, self.vocabulary.decode(ids), row))
                if progress is not None:
                    progress(len(out), len(rows))
        return out

    # ------------------------------------------------------------------------------ score
    def score(self, texts_or_inputs: Sequence[Text], targets: Sequence[Text] | None = None,
              *, max_length: int | None = None, add_eos: bool = True,
              progress: Progress | None = None) -> np.ndarray:
        """<float32>[n] sum of target-token log-likelihoods (EOS included), teacher-forced.

        Decoder-only: `score(texts)` gives log p(text + EOS). Encoder-decoder:
        `score(inputs, targets)` gives log p(targets + EOS | inputs + EOS). With
        `add_eos=False` no EOS is appended (for ids that already end in it).
        """
        length = self.max_length if max_length is None else int(max_length)
        first = self._ids(texts_or_inputs, "input" if self.is_encoder_decoder else "text")
        eos = [self.eos_id] if add_eos else []
        if self.is_encoder_decoder:
            if targets is None:
                raise ValueError("Scoring with an encoder-decoder needs targets: "
                                 "score(inputs, targets).")
            second = self._ids(targets, "target")
            if len(second) != len(first):
                raise ValueError(f"score got {len(first)} inputs but {len(second)} targets; "
                                 f"pass one target per input.")
            enc_rows = [x + eos for x in first]
            tgt_rows = [x + eos for x in second]
            _check_lengths(enc_rows, self.max_input_length, "input",
                           "max_input_length (gin MAX_INPUT_LENGTH)")
            _check_lengths(tgt_rows, length, "targets", "max_length (gin MAX_LENGTH)")
        else:
            if targets is not None:
                raise ValueError("A decoder-only model scores whole texts: call score(texts) "
                                 "without targets (join input and target into one text).")
            enc_rows, tgt_rows = None, [x + eos for x in first]
            _check_lengths(tgt_rows, length, "text", "max_length (gin MAX_LENGTH)")
        scores = np.zeros((len(tgt_rows),), np.float32)
        with partitioning.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for start in range(0, len(tgt_rows), self.batch_size):
                stop = min(start + self.batch_size, len(tgt_rows))
                tgt = _pad(tgt_rows[start:stop], self.batch_size, length)
                batch = {"decoder_input_tokens": jnp.asarray(_shift_right(tgt)),
                         "decoder_target_tokens": jnp.asarray(tgt)}
                if enc_rows is not None:
                    batch["encoder_input_tokens"] = jnp.asarray(
                        _pad(enc_rows[start:stop], self.batch_size, self.max_input_length))
                scores[start:stop] = np.asarray(self._score(self.params, batch))[:stop - start]
                if progress is not None:
                    progress(stop, len(tgt_rows))
        return scores


def _check_lengths(rows: Sequence[Sequence[int]], limit: int, what: str, knob: str) -> None:
    """Raises ValueError naming the first row longer than `limit` tokens and what to raise."""
    for i, x in enumerate(rows):
        if len(x) > limit:
            raise ValueError(f"Example {i}'s {what} has {len(x)} tokens, more than the {limit} "
                             f"allowed; raise {knob} or shorten it.")


def _pad(rows: Sequence[Sequence[int]], batch_size: int, length: int) -> np.ndarray:
    """<int32>[batch_size, length]: the rows left-aligned, zero padded (lengths are checked)."""
    arr = np.zeros((batch_size, length), np.int32)
    for i, x in enumerate(rows):
        arr[i, :len(x)] = x
    return arr


def _shift_right(arr: np.ndarray) -> np.ndarray:
    """Decoder inputs of teacher forcing: the targets shifted right behind a 0 (BOS)."""
    return np.concatenate([np.zeros((arr.shape[0], 1), np.int32), arr[:, :-1]], 1)


def _until_eos(row: np.ndarray, eos_id: int) -> list[int]:
    """The ids of a decoded row before the first EOS, padding (0) ids removed."""
    ids = [int(t) for t in row]
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return [t for t in ids if t]


__all__ = ["Generation", "Predictor"]
