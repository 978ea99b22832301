"""Inference entry point: decode (or score) prompts from a file with a checkpoint, to JSONL.

    python -m moetx.trainer.infer --gin_file=models/decoder_small.gin --gin_file=runs/infer.gin \\
      --gin.CHECKPOINT_DIR="'runs/demo'" --gin.PROMPTS_FILE="'prompts.txt'" \\
      --gin.TEMPERATURE=0.8 --gin.TOPK=40

Modes: `predict` writes {"prompt", "output", "output_ids"} per line; `score` writes
{"text", "score"} (sum of token log-likelihoods, EOS included).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from moetx.trainer import xla_env  # noqa: E402  (jax-free; must run before jax is imported)

xla_env.configure_cpu_defaults()

if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy, so gin registers each
    # configurable once (as `moetx.trainer.infer.*`).
    from moetx.trainer.infer import console_main

    console_main()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moetx.trainer import checkpoints, cli, partitioning, trainer as trainer_lib  # noqa: E402
from moetx.trainer import optimizers  # noqa: E402


def read_prompts(path: str) -> list[dict]:
    """One example per line of a text file (`{"prompt": line}`), or per JSON object of a .jsonl
    file (`prompt`/`inputs`/`text` field, and `targets` for scoring an encoder-decoder)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Prompts file {path!r} does not exist.")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                obj = json.loads(line)
                key = next((k for k in ("prompt", "inputs", "text") if k in obj), None)
                if key is None:
                    raise ValueError(f"{path}:{n}: expected a 'prompt', 'inputs' or 'text' field.")
                examples.append({"prompt": obj[key], "targets": obj.get("targets")})
            else:
                examples.append({"prompt": line, "targets": None})
    if not examples:
        raise ValueError(f"Prompts file {path!r} has no prompts.")
    return examples


def _pad(rows: list[list[int]], batch_size: int, length: int, what: str) -> np.ndarray:
    arr = np.zeros((batch_size, length), np.int32)
    for i, x in enumerate(rows):
        if len(x) > length:
            raise ValueError(f"An example's {what} has {len(x)} tokens, more than the {length} "
                             f"allowed; raise --gin.MAX_LENGTH / --gin.MAX_INPUT_LENGTH.")
        arr[i, :len(x)] = x
    return arr


def _shift_right(arr: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((arr.shape[0], 1), np.int32), arr[:, :-1]], 1)


def _generated(row: np.ndarray, eos_id: int) -> list[int]:
    gen = [int(t) for t in row]
    if eos_id in gen:
        gen = gen[:gen.index(eos_id)]
    return [t for t in gen if t]


@gin.configurable
def infer(
    model: Any = gin.REQUIRED,
    checkpoint_dir: str = gin.REQUIRED,
    prompts_file: str = gin.REQUIRED,
    output_file: str | None = None,
    vocabulary_path: str | None = None,
    vocabulary_extra_ids: int = 0,
    max_length: int = 64,
    max_input_length: int = 128,
    temperature: float = 0.0,
    topk: int = 0,
    topp: float = 0.0,
    num_beams: int = 0,
    alpha: float = 0.6,
    seed: int = 0,
    batch_size: int = 8,
    mode: str = "predict",
    checkpoint_step: int | None = None,
    mesh_fn: Callable = partitioning.make_mesh,
    rules_fn: Callable = partitioning.standard_logical_axis_rules,
) -> list[dict]:
    """Greedy (temperature 0), sampled (top-k or top-p) or beam-search (`num_beams` > 0, T5X
    length penalty `alpha`) decoding with the KV cache, or scoring.

    Decoder-only: `max_length` bounds prompt + continuation. Encoder-decoder: the prompt (plus
    EOS) is the encoder input, up to `max_input_length` tokens, and up to `max_length` target
    tokens are decoded; scoring needs `targets` in a JSONL file. Span-corruption models use the
    vocabulary with `vocabulary_extra_ids=100` (sentinels `<extra_id_N>`).
    """
    from moetx.tasks import vocab as vocab_lib

    if mode not in ("predict", "score"):
        raise ValueError(f"mode must be 'predict' or 'score', got {mode!r}.")
    enc_dec = getattr(model, "is_encoder_decoder", False)
    vocab = vocab_lib.get_vocabulary(vocabulary_path, extra_ids=vocabulary_extra_ids)
    examples = read_prompts(prompts_file)
    if enc_dec and mode == "score" and any(e["targets"] is None for e in examples):
        raise ValueError("Scoring an encoder-decoder needs a .jsonl prompts file with 'inputs' "
                         "and 'targets' fields.")
    mesh, rules = mesh_fn(), tuple(rules_fn())
    lengths = {"inputs": max_input_length, "targets": max_length} if enc_dec else max_length
    trainer = trainer_lib.Trainer(model, optimizers.make_optimizer, mesh, rules,
                                  model.input_shapes(batch_size, lengths))
    abstract = trainer.abstract_state_with_shardings().params
    params, step = checkpoints.restore_params(checkpoint_dir, checkpoint_step, abstract)
    eos = int(vocab.eos_id)

    with mesh, nn.logical_axis_rules(rules):
        static = ("eos_id", "temperature", "topk", "topp", "num_beams", "alpha") + (
            ("max_decode_length",) if enc_dec else ())
        predict = jax.jit(model.predict_batch, static_argnames=static)
        score = jax.jit(model.score_batch)
        results = []
        t0 = time.perf_counter()
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            ids = [list(vocab.encode(e["prompt"])) for e in chunk]
            rng = jax.random.fold_in(jax.random.PRNGKey(seed), start)
            kw = dict(eos_id=eos, temperature=float(temperature), topk=int(topk),
                      topp=float(topp), num_beams=int(num_beams), alpha=float(alpha))
            if enc_dec:
                enc = jnp.asarray(_pad([x + [eos] for x in ids], batch_size, max_input_length,
                                       "input"))
                if mode == "predict":
                    out = np.asarray(predict(params, enc, rng=rng, max_decode_length=max_length,
                                             **kw))
                    gens = [_generated(out[i], eos) for i in range(len(chunk))]
                else:
                    tgt = _pad([list(vocab.encode(e["targets"])) + [eos] for e in chunk],
                               batch_size, max_length, "targets")
                    batch = {"encoder_input_tokens": enc,
                             "decoder_target_tokens": jnp.asarray(tgt),
                             "decoder_input_tokens": jnp.asarray(_shift_right(tgt))}
            else:
                if mode == "predict":
                    arr = _pad(ids, batch_size, max_length - 1, "prompt")
                    arr = np.concatenate([arr, np.zeros((batch_size, 1), np.int32)], 1)
                    plen = np.array([len(x) for x in ids] + [0] * (batch_size - len(ids)),
                                    np.int32)
                    out = np.asarray(predict(params, jnp.asarray(arr), jnp.asarray(plen),
                                             rng, **kw))
                    gens = [_generated(out[i, plen[i]:], eos) for i in range(len(chunk))]
                else:
                    tgt = _pad([x + [eos] for x in ids], batch_size, max_length, "text")
                    batch = {"decoder_input_tokens": jnp.asarray(_shift_right(tgt)),
                             "decoder_target_tokens": jnp.asarray(tgt)}
            if mode == "predict":
                results.extend({"prompt": e["prompt"], "output": vocab.decode(g),
                                "output_ids": g} for e, g in zip(chunk, gens))
            else:
                scores = np.asarray(score(params, batch))
                results.extend({"text": e["prompt"], **({"targets": e["targets"]}
                                                        if e["targets"] is not None else {}),
                                "score": float(s)} for e, s in zip(chunk, scores))
            done = min(start + batch_size, len(examples))
            rate = done / (time.perf_counter() - t0)
            print(f"[infer] {done}/{len(examples)} prompts | {rate:.2f} prompts/s | ETA "
                  f"{(len(examples) - done) / rate:.0f}s", file=sys.stderr, flush=True)

    output_file = output_file or os.path.join(checkpoint_dir, f"infer_{mode}_{step}.jsonl")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        tmp = output_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, output_file)
        print(f"[infer] wrote {len(results)} results of checkpoint_{step} to {output_file}",
              file=sys.stderr, flush=True)
    return results


def main(args) -> None:
    del args
    for r in infer():
        if "output" in r:
            print(f"{r['prompt']} ▸ {r['output']}", flush=True)


def console_main() -> None:
    sys.exit(cli.run(main, module_imports=("moetx.lm.models", "moetx.tasks")))

