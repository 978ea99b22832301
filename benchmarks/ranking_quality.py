"""Re-ranking quality on the MSLR-WEB30K sample: the base ranker, a pointwise and a listwise
baseline, and seq2slate with both objectives, under both click models, over several seeds.

For each click model ('position', 'diversity') and seed, the slates of `moetx.ranking.tasks`
(the base ranker's top-10 of candidate pools; clicks simulated with that seed) are used to train,
from the clicks only, with moetx's `Trainer` (the train step `python -m moetx.cli.train` runs):

  pointwise                 MLP scorer, sigmoid cross entropy per item (rax)
  listwise                  MLP scorer, softmax cross entropy over the slate (rax)
  seq2slate_weak_supervision  pointer network (LSTM), per-step cross entropy from clicks
  seq2slate_reinforce         pointer network (LSTM), REINFORCE on the NDCG against the clicks,
                              moving-average baseline

and evaluated on the test split's slates (NDCG@5/@10 against the graded labels, rax). The base
ranker's figures are those of the input order of the same slates. Prints one JSON line: each
figure's mean and standard deviation over the seeds, and the training throughput (slates per
second, after compilation) of every model. Progress goes to stderr.

    nice -n 10 .venv/bin/python benchmarks/ranking_quality.py            # 3 seeds
    .venv/bin/python benchmarks/ranking_quality.py --seeds 1 --steps 100  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from moetx.util import xla_env  # noqa: E402

xla_env.configure_cpu_defaults()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from moetx.ranking import model as ranking_model, tasks  # noqa: E402
from moetx.trainer import data, optimizers, partitioning, trainer as trainer_lib  # noqa: E402

MODELS = {
    "pointwise": lambda: ranking_model.ScoringRankerModel(loss="pointwise"),
    "listwise": lambda: ranking_model.ScoringRankerModel(loss="softmax"),
    "seq2slate_weak_supervision": lambda: ranking_model.Seq2SlateModel(
        objective="weak_supervision"),
    "seq2slate_reinforce": lambda: ranking_model.Seq2SlateModel(
        objective="reinforce", reward="clicks", baseline="moving_average", num_samples=4),
}
FEATURES = ("features", "item_mask", "labels", "clicks")


def log(msg: str) -> None:
    print(f"[ranking_quality] {msg}", file=sys.stderr, flush=True)


def batches(arrays: dict, batch_size: int, seed: int):
    """Endless shuffled batches (reshuffled every epoch) of the training slates."""
    n = len(arrays["item_mask"])
    rng = np.random.RandomState(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            yield {k: arrays[k][rows] for k in FEATURES}


def eval_batches(arrays: dict, batch_size: int):
    n = len(arrays["item_mask"])
    for start in range(0, n, batch_size):
        yield data.pad_batch({k: arrays[k][start:start + batch_size] for k in FEATURES},
                             batch_size)


def run(name: str, train_arrays: dict, test_arrays: dict, args, seed: int) -> dict:
    """Trains one model; its test metrics and training slates per second."""
    model = MODELS[name]()
    k, f = train_arrays["features"].shape[1:]
    steps = args.steps if name.startswith("seq2slate") else args.scorer_steps
    schedule = optimizers.warmup_cosine_schedule(args.learning_rate, args.warmup, steps, 0.05)
    trainer = trainer_lib.Trainer(
        model, lambda param_axes: optimizers.adamw(schedule, param_axes, b2=0.999,
                                                   weight_decay=1e-4),
        partitioning.make_mesh((-1, 1, 1)), partitioning.standard_logical_axis_rules(),
        model.input_shapes(args.batch_size, {"features": (k, f)}), seed=seed)
    state = trainer.init_state()
    it = batches(train_arrays, args.batch_size, seed)
    # Step 1 compiles; the throughput is timed over the rest.
    state, sums = trainer.train_step(state, trainer.to_global(next(it)))
    jax.block_until_ready(sums)
    start = time.perf_counter()
    for _ in range(steps - 1):
        state, sums = trainer.train_step(state, trainer.to_global(next(it)))
    jax.block_until_ready(sums)
    rate = (steps - 1) * args.batch_size / (time.perf_counter() - start)
    metrics = trainer.evaluate(state.params, eval_batches(test_arrays, args.batch_size),
                               model_state=state.model_state)
    return {"metrics": metrics, "slates_per_sec": rate}


def mean_std(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": round(float(v.mean()), 4), "std": round(float(v.std()), 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=800, help="seq2slate training steps")
    parser.add_argument("--scorer_steps", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--click_models", default="position,diversity")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    models = args.models.split(",")
    t0 = time.time()
    results: dict = {}
    rates: dict = {m: [] for m in models}
    for click_model in args.click_models.split(","):
        per_model: dict = {m: {"ndcg@5": [], "ndcg@10": []} for m in ["base_ranker", *models]}
        for seed in range(args.seeds):
            settings = dict(click_model=click_model, seed=seed)
            train_arrays = tasks.mslr_slates("train", **settings)
            test_arrays = tasks.mslr_slates("test", **settings)
            for name in models:
                out = run(name, train_arrays, test_arrays, args, seed)
                m = out["metrics"]
                rates[name].append(out["slates_per_sec"])
                for t in ("ndcg@5", "ndcg@10"):
                    per_model[name][t].append(m[t])
                log(f"{click_model} seed {seed} {name}: ndcg@5 {m['ndcg@5']:.4f} ndcg@10 "
                    f"{m['ndcg@10']:.4f} (base {m['base_ndcg@5']:.4f} / {m['base_ndcg@10']:.4f})"
                    f", {out['slates_per_sec']:.0f} slates/s, {time.time() - t0:.0f}s")
            for t in ("ndcg@5", "ndcg@10"):
                per_model["base_ranker"][t].append(m[f"base_{t}"])
        results[click_model] = {name: {t: mean_std(v) for t, v in per.items()}
                                for name, per in per_model.items()}
    print(json.dumps({
        "benchmark": "ranking_quality",
        "data": "MSLR-WEB30K sample (rankeval 0.8.2): 43 train / 43 test queries",
        "slates": {"train": int(len(train_arrays["item_mask"])),
                   "test": int(len(test_arrays["item_mask"])), "slate_size": 10},
        "seeds": args.seeds, "seq2slate_steps": args.steps, "scorer_steps": args.scorer_steps,
        "batch_size": args.batch_size,
        "results": results,
        "train_slates_per_sec": {m: round(float(np.mean(r)), 1) for m, r in rates.items()},
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "seconds": round(time.time() - t0, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
