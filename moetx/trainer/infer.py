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


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a text file, or per JSON object of a .jsonl file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Prompts file {path!r} does not exist.")
    prompts = []
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
                line = obj[key]
            prompts.append(line)
    if not prompts:
        raise ValueError(f"Prompts file {path!r} has no prompts.")
    return prompts


@gin.configurable
def infer(
    model: Any = gin.REQUIRED,
    checkpoint_dir: str = gin.REQUIRED,
    prompts_file: str = gin.REQUIRED,
    output_file: str | None = None,
    vocabulary_path: str | None = None,
    max_length: int = 64,
    temperature: float = 0.0,
    topk: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    mode: str = "predict",
    checkpoint_step: int | None = None,
    mesh_fn: Callable = partitioning.make_mesh,
    rules_fn: Callable = partitioning.standard_logical_axis_rules,
) -> list[dict]:
    """Greedy (temperature 0) or sampled decoding with the KV cache, or scoring."""
    from moetx.tasks import vocab as vocab_lib

    if mode not in ("predict", "score"):
        raise ValueError(f"mode must be 'predict' or 'score', got {mode!r}.")
    vocab = vocab_lib.get_vocabulary(vocabulary_path)
    prompts = read_prompts(prompts_file)
    mesh, rules = mesh_fn(), tuple(rules_fn())
    shapes = model.input_shapes(batch_size, max_length)
    trainer = trainer_lib.Trainer(model, optimizers.make_optimizer, mesh, rules, shapes)
    abstract = trainer.abstract_state_with_shardings().params
    params, step = checkpoints.restore_params(checkpoint_dir, checkpoint_step, abstract)

    with mesh, nn.logical_axis_rules(rules):
        predict = jax.jit(model.predict_batch, static_argnames=("eos_id", "temperature", "topk"))
        score = jax.jit(model.score_batch)
        results = []
        t0 = time.perf_counter()
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids = [list(vocab.encode(p)) for p in chunk]
            if mode == "score":
                ids = [x + [vocab.eos_id] for x in ids]
            for p, x in zip(chunk, ids):
                if len(x) >= max_length:
                    raise ValueError(f"Prompt of {len(x)} tokens does not fit MAX_LENGTH "
                                     f"{max_length}: {p[:60]!r}...; raise --gin.MAX_LENGTH.")
            arr = np.zeros((batch_size, max_length), np.int32)
            for i, x in enumerate(ids):
                arr[i, :len(x)] = x
            lengths = np.array([len(x) for x in ids] + [0] * (batch_size - len(ids)), np.int32)
            if mode == "predict":
                rng = jax.random.fold_in(jax.random.PRNGKey(seed), start)
                out = np.asarray(predict(params, jnp.asarray(arr), jnp.asarray(lengths), rng,
                                         eos_id=int(vocab.eos_id), temperature=float(temperature),
                                         topk=int(topk)))
                for i, p in enumerate(chunk):
                    gen = [int(t) for t in out[i, lengths[i]:]]
                    if vocab.eos_id in gen:
                        gen = gen[:gen.index(vocab.eos_id)]
                    gen = [t for t in gen if t]
                    results.append({"prompt": p, "output": vocab.decode(gen), "output_ids": gen})
            else:
                inputs = np.concatenate([np.zeros((batch_size, 1), np.int32), arr[:, :-1]], 1)
                batch = {"decoder_input_tokens": jnp.asarray(inputs),
                         "decoder_target_tokens": jnp.asarray(arr),
                         "decoder_loss_weights": jnp.asarray((arr > 0).astype(np.float32))}
                scores = np.asarray(score(params, batch))
                results.extend({"text": p, "score": float(s)} for p, s in zip(chunk, scores))
            done = min(start + batch_size, len(prompts))
            rate = done / (time.perf_counter() - t0)
            print(f"[infer] {done}/{len(prompts)} prompts | {rate:.2f} prompts/s | ETA "
                  f"{(len(prompts) - done) / rate:.0f}s", file=sys.stderr, flush=True)

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

