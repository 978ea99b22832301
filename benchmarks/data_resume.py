#!/usr/bin/env python
"""Seconds to the first batch after resuming at batch N: SeqIO's skip path vs the indexed path.

The data of the demo run (`runs/pretrain.gin` with `models/decoder_small.gin`): task
`moetx_en_causal_lm`, split 'train', targets 128, global batch 16, shuffled with seed 0, one
process. For each N the clock runs from building the pipeline at batch N (the trainer's
`make_batches`: `data.get_dataset` + `DataIterator(ds, N)`, or `indexed_data.indexed_batches`)
to the first batch in hand. The indexed store is built first, in `--index_dir` (default: a new
temporary folder, removed at the end, so the one-time build is measured too:
`index_build_seconds`).

Prints one JSON line per N on stdout (with the 1-minute load average before and after, as the
machine is shared); progress goes to stderr.

  .venv/bin/python benchmarks/data_resume.py
  .venv/bin/python benchmarks/data_resume.py --n 0 2000 --skip_seqio
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import reserve_stdout_for_json  # noqa: E402

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[data_resume {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[0, 2000, 20000])
    p.add_argument("--task", default="moetx_en_causal_lm")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index_dir", default=None, help="keep (and reuse) the store here")
    p.add_argument("--skip_seqio", action="store_true")
    args = p.parse_args(argv)
    json_out = reserve_stdout_for_json(xla_tuning=False)

    import gin

    from moetx.cli import flags
    from moetx.util import gin_files

    flags.register_tasks()
    gin_files.parse_files(["models/decoder_small.gin"])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    converter = model.feature_converter
    index_dir = args.index_dir or tempfile.mkdtemp(prefix="moetx_data_resume_")
    try:
        return _measure(args, json_out, converter, index_dir)
    finally:
        if not args.index_dir:
            shutil.rmtree(index_dir, ignore_errors=True)


def _measure(args, json_out, converter, index_dir: str) -> int:
    import gin

    from moetx.trainer import data, indexed_data

    gin.bind_parameter("moetx.trainer.indexed_data.index_dir.path", index_dir)

    def cfg(pipeline: str) -> data.DatasetConfig:
        return data.DatasetConfig(args.task, {"targets": args.length}, batch_size=args.batch,
                                  shuffle=True, seed=args.seed, pipeline=pipeline)

    log(f"building the indexed store in {index_dir}")
    start = time.perf_counter()
    store = indexed_data.Store.open(indexed_data.materialize(cfg("indexed"), converter))
    build = time.perf_counter() - start
    log(f"{store.num_rows:,} rows ({store.num_rows // args.batch:,} batches an epoch) "
        f"in {build:.1f} s")
    rows = slice(0, args.batch)

    for n in args.n:
        line = {"benchmark": "data_resume", "task": args.task, "targets": args.length,
                "batch": args.batch, "resume_at_batch": n, "load_before": load()}
        if not args.skip_seqio:
            log(f"seqio: first batch after skipping {n} batches")
            start = time.perf_counter()
            ds = data.get_dataset(cfg("seqio"), converter, 0, 1, args.batch, None)
            next(data.DataIterator(ds, n))
            line["seqio_seconds"] = round(time.perf_counter() - start, 3)
        log(f"indexed: first batch at batch {n}")
        start = time.perf_counter()
        next(indexed_data.indexed_batches(cfg("indexed"), converter, rows, n, None))
        line["indexed_seconds"] = round(time.perf_counter() - start, 3)
        line.update(index_build_seconds=round(build, 1), index_rows=store.num_rows,
                    load_after=load())
        log(json.dumps(line))
        json_out.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
