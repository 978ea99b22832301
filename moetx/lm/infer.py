"""Decode (or score) prompts from a file with a checkpoint, to JSONL.

The command line is `python -m moetx.cli.infer` (`moetx-infer`):

    python -m moetx.cli.infer --gin_file=models/decoder_small.gin --gin_file=runs/infer.gin \\
      --gin.CHECKPOINT_DIR="'runs/demo'" --gin.PROMPTS_FILE="'prompts.txt'" \\
      --gin.TEMPERATURE=0.8 --gin.TOPK=40

Modes: `predict` writes {"prompt", "output", "output_ids"} per line; `score` writes
{"text", "score"} (sum of token log-likelihoods, EOS included), plus "targets" when the
prompts file gave them. The decoding and scoring are `moetx.lm.predict.Predictor`'s; this module
adds the files.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import gin
import jax

from moetx.lm import predict as predict_lib
from moetx.trainer import checkpoints, partitioning


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

    `checkpoint_dir` is a model directory (its newest checkpoint, or `checkpoint_step`) or one
    of its `checkpoint_<step>` directories; the output goes to `output_file`, by default
    `infer_<mode>_<step>.jsonl` in the model directory. Returns the rows written.
    """
    from moetx.datasets import vocab as vocab_lib

    if mode not in ("predict", "score"):
        raise ValueError(f"mode must be 'predict' or 'score', got {mode!r}.")
    enc_dec = getattr(model, "is_encoder_decoder", False)
    vocab = vocab_lib.get_vocabulary(vocabulary_path, extra_ids=vocabulary_extra_ids)
    examples = read_prompts(prompts_file)
    if enc_dec and mode == "score" and any(e["targets"] is None for e in examples):
        raise ValueError("Scoring an encoder-decoder needs a .jsonl prompts file with 'inputs' "
                         "and 'targets' fields.")
    model_dir, checkpoint_step = checkpoints.resolve_checkpoint(checkpoint_dir, checkpoint_step)
    predictor = predict_lib.Predictor.from_checkpoint(
        model, model_dir, step=checkpoint_step, vocabulary=vocab, batch_size=batch_size,
        max_length=max_length, max_input_length=max_input_length, mesh=mesh_fn(),
        rules=rules_fn())
    prompts = [e["prompt"] for e in examples]
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / (time.perf_counter() - t0)
        print(f"[infer] {done}/{total} prompts | {rate:.2f} prompts/s | ETA "
              f"{(total - done) / rate:.0f}s", file=sys.stderr, flush=True)

    if mode == "predict":
        generations = predictor.generate(
            prompts, temperature=temperature, topk=topk, topp=topp, num_beams=num_beams,
            alpha=alpha, seed=seed, progress=progress)
        results = [{"prompt": e["prompt"], "output": g.text, "output_ids": g.ids}
                   for e, g in zip(examples, generations)]
    else:
        targets = [e["targets"] for e in examples] if enc_dec else None
        scores = predictor.score(prompts, targets, progress=progress)
        results = [{"text": e["prompt"], **({"targets": e["targets"]}
                                            if e["targets"] is not None else {}),
                    "score": float(s)} for e, s in zip(examples, scores)]

    step = predictor.step
    output_file = output_file or os.path.join(model_dir, f"infer_{mode}_{step}.jsonl")
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
