#!/usr/bin/env python
"""Runs the side-by-side benchmark rows (what `make bench` runs) and keeps every JSON line.

Each row is one command line of a benchmark script in this directory, run in its own process,
one at a time (the machine's cores are the measurement). Every JSON line a row prints is
appended, with `row`, `mode`, `command`, the git commit and the row's wall time added under
`run_all`, to `benchmarks/results/<UTC date>.jsonl` (`--out` to choose), as soon as the row
ends; `benchmarks/readme_table.py` turns the file into the README's table and plot. Progress
(row i/n, elapsed, an ETA: each row's time guessed from its FLOPs, scaled by how the finished
rows' times compared with their guesses) and the scripts' own progress go to stderr. A row that
fails is recorded as a `run_all_failure` line (exit code and the end of its stderr) and the run
goes on; the exit code is 1 if any did.

Modes:
  (default)  the realistic rows of issue 16, side by side with Hugging Face (eager and
             torch.compile, the faster is the peer), with Adafactor and with AdamW, and each
             side's peak RSS (`--memory`; `--no_memory` skips it):
               encdec_*   T5.1.1 encoder-decoder at T5.1.1-small's shape: d_model 512, d_ff 1024
                          gated-GELU, 8+8 layers, 6 heads x 64, vocab 32128, 512 -> 114 tokens,
                          batch 8 (the Adafactor row also times greedy decoding vs `generate`);
               decoder_*  decoder-only at that width: 8 layers, sequence 512, batch 8, T5.1.1
                          options (`t5`) and the Llama option set (`llama`, vs LlamaForCausalLM);
               switch_*   the encoder-decoder above with 8 experts in every 2nd layer, top-1
                          (ReLU experts: HF Switch has no gated experts; tied logits; the
                          Adafactor row also profiles both sides per op family);
               moe_vs_dense  moetx's decoder with 8 experts top-1 in every 2nd layer vs the
                          dense model of equal active FLOPs (no HF side);
               means      the means of issue 16 one by one (bf16 activations, remat
                          policies, scanned layers, no donation) on moetx's enc-dec step
                          (means.py);
               input_pipeline  sequence packing per pretraining objective and tf.data
                          prefetching in `make demo`'s jobs (input_pipeline.py);
               compile_cache  time to the first step, JAX's compilation cache cold and warm,
                          for `make demo`'s job and T5.1.1-small (compile_cache.py);
               step_ops   attention and the logits head + loss alone, in each way of computing
                          them (blocked / chunked, layouts, jax.nn.dot_product_attention),
                          beside torch's (step_ops.py);
               profile_encdec  where the enc-dec Adafactor step's time goes per op family,
                          moetx beside HF eager (profile_step.py; the README's profile table);
               vision_*   the vision rows against timm (vision_throughput.py's shapes), with
                          each side's peak RSS;
               profile_vision_*  where each vision row's step time goes per op family,
                          moetx beside timm (profile_vision.py; the README's vision profile
                          tables).
             Minutes per row on a 2-core machine: run it on an idle one.
  --quick    the same rows at tiny shapes (d_model 64, 2 layers, batch 2, 32 tokens, 2 steps):
             a check that every row runs end to end, not a measurement.
  --sweep    decoder-only T5.1.1-style rows at d_model 256, 512, 768, 1024 (T5.1.1's widths:
             the demo's 4 heads / d_ff 512, small's 6 / 1024, base's 12 / 2048, large's 16 /
             2816; 8 layers, sequence 512, batch 8, vocab 32128, Adafactor, both peers) for the
             scaling plot. With --quick, tiny widths 32-128.

  .venv/bin/python benchmarks/run_all.py --list                  # the rows and their commands
  .venv/bin/python benchmarks/run_all.py                         # the realistic rows
  .venv/bin/python benchmarks/run_all.py --sweep
  .venv/bin/python benchmarks/run_all.py --quick --only decoder_t5_adafactor --no_memory
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark command: `script` (in benchmarks/) with `args`; `cost` is a rough guess of
    its run time in seconds (`_cost`), which only the ETA uses, scaled by how the finished rows'
    times compared with their guesses."""

    name: str
    script: str
    args: tuple[str, ...]
    cost: float

    def command(self, python: str) -> list[str]:
        return [python, os.path.join(HERE, self.script), *self.args]


def _flags(**kw) -> tuple[str, ...]:
    """`--key value` pairs in order; a value of True is a bare flag."""
    out = []
    for k, v in kw.items():
        out += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return tuple(out)


def _cost(d_model: int, d_ff: int, layers: int, vocab: int, tokens: int, runs: int,
          sides: int, memory: bool = False) -> float:
    """Guessed seconds: a fixed part (imports, matmul peaks, compilations; more with the memory
    children) plus the steps' 6 N FLOPs per token (N: attention 4 d^2 and a gated MLP 3 d d_ff
    per layer, plus the logits) at 50 GFLOP/s."""
    n = layers * (4 * d_model ** 2 + 3 * d_model * d_ff) + d_model * vocab
    return 60.0 + (120.0 if memory else 0.0) + 6.0 * n * tokens * runs * sides / 50e9


# T5.1.1-small's shape (issue 16) and the tiny one --quick uses instead.
REALISTIC = {"d_model": 512, "d_ff": 1024, "layers": 8, "heads": 6, "head_dim": 64,
             "vocab": 32128, "batch": 8, "length": 512, "input_length": 512,
             "target_length": 114, "experts": 8, "steps": 5, "warmup": 2}
TINY = {"d_model": 64, "d_ff": 128, "layers": 2, "heads": 2, "head_dim": 32, "vocab": 256,
        "batch": 2, "length": 32, "input_length": 32, "target_length": 16, "experts": 4,
        "steps": 2, "warmup": 1}
# --sweep widths: (d_model, heads, d_ff), T5.1.1's (demo, small, base, large).
SWEEP = ((256, 4, 512), (512, 6, 1024), (768, 12, 2048), (1024, 16, 2816))
SWEEP_TINY = ((32, 1, 64), (64, 2, 128), (96, 3, 192), (128, 4, 256))
VISION = (("resnet_rs", {"model": "resnet_rs/50"}),
          ("efficientnet", {"model": "efficientnet_v2/b0", "image_size": 96}),
          ("coatnet", {"model": "coatnet/0"}),
          ("gmlp", {"model": "gmlp/s"}))


def side_by_side_rows(s: dict, memory: bool, quick: bool) -> list[Row]:
    """The moetx-vs-HF training rows (and decode, MoE-vs-dense, vision) at shape `s`."""
    def width(heads: int) -> tuple[str, ...]:
        return _flags(d_model=s["d_model"], d_ff=s["d_ff"], heads=heads,
                      head_dim=s["head_dim"], vocab=s["vocab"])

    # A Llama's width is its heads x head_dim (LlamaConfig cannot express T5.1.1-small's 6 x 64
    # heads at d_model 512), so the Llama row keeps head_dim and the width and takes
    # d_model / head_dim heads: 8 x 64 at d_model 512.
    heads = {"t5": s["heads"], "llama": s["d_model"] // s["head_dim"]}

    timing = _flags(steps=s["steps"], warmup=s["warmup"])
    mem = ("--memory",) if memory else ()

    def common(opt: str, arch: str = "t5") -> tuple[str, ...]:
        return (*width(heads[arch]), "--optimizer", opt, *timing, *mem)

    runs = s["steps"] + s["warmup"]
    enc_tokens = s["batch"] * (s["input_length"] + s["target_length"])
    dec_tokens = s["batch"] * s["length"]
    rows = []
    for opt in ("adafactor", "adamw"):
        # Greedy decoding is timed once, in the Adafactor row (it does not train).
        decode = () if opt == "adafactor" else ("--skip_decode",)
        rows.append(Row(f"encdec_{opt}", "encdec_throughput.py",
                        (*_flags(layers=s["layers"], batch=s["batch"],
                                 input_length=s["input_length"],
                                 target_length=s["target_length"]), *common(opt), *decode),
                        _cost(s["d_model"], s["d_ff"], 2 * s["layers"], s["vocab"], enc_tokens,
                              runs, 3, memory)))
        for arch in ("t5", "llama"):
            rows.append(Row(f"decoder_{arch}_{opt}", "train_throughput.py",
                            (*_flags(arch=arch, layers=s["layers"], batch=s["batch"],
                                     length=s["length"]), *common(opt, arch)),
                            _cost(s["d_model"], s["d_ff"], s["layers"], s["vocab"], dec_tokens,
                                  runs, 3, memory)))
        rows.append(Row(f"switch_{opt}", "moe_throughput.py",
                        ("--only", "moetx_vs_hf_switch",
                         *_flags(switch_layers=s["layers"], switch_batch=s["batch"],
                                 switch_experts=s["experts"], input_length=s["input_length"],
                                 target_length=s["target_length"]), *common(opt),
                         # The Adafactor row also profiles both sides per op family.
                         *(("--profile",) if opt == "adafactor" else ())),
                        _cost(s["d_model"], s["d_ff"], 2 * s["layers"], s["vocab"], enc_tokens,
                              runs + (2 if opt == "adafactor" else 0), 3, memory)))
    rows.append(Row("moe_vs_dense", "moe_throughput.py",
                    ("--only", "moe_vs_dense", *width(heads["t5"]),
                     *_flags(layers=s["layers"], batch=s["batch"], length=s["length"],
                             experts=s["experts"], top_k=1, sparse_every=2), *timing,
                     "--profile", *mem),
                    _cost(s["d_model"], s["d_ff"], s["layers"], s["vocab"], dec_tokens, runs + 3,
                          2, memory)))
    # Where the enc-dec step's time goes, per op family, beside torch's (the README's profile
    # table): three warmup steps (a process's first few steps at this shape can spend seconds
    # faulting in heap pages), one timed and one profiled step per side.
    rows.append(Row("profile_encdec", "profile_step.py",
                    (*width(heads["t5"]),
                     *_flags(layers=s["layers"], batch=s["batch"],
                             input_length=s["input_length"], target_length=s["target_length"],
                             steps=1, warmup=3)),
                    _cost(s["d_model"], s["d_ff"], 2 * s["layers"], s["vocab"], enc_tokens, 5,
                          2)))
    # The means of issue 16 one by one on the Adafactor enc-dec step (moetx only).
    rows.append(Row("means", "means.py",
                    (*width(heads["t5"]),
                     *_flags(layers=s["layers"], batch=s["batch"],
                             input_length=s["input_length"], target_length=s["target_length"],
                             steps=min(3, s["steps"]), warmup=1)),
                    _cost(s["d_model"], s["d_ff"], 2 * s["layers"], s["vocab"], enc_tokens, 4,
                          7)))
    # The input pipeline's means: packing per objective, prefetching in `make demo`'s jobs.
    rows.append(Row("input_pipeline", "input_pipeline.py",
                    _flags(batches=2, steps=20, repeats=1) if quick else (), 60.0 if quick
                    else 400.0))
    # Time to the first step with the compilation cache cold and warm.
    rows.append(Row("compile_cache", "compile_cache.py",
                    _flags(repeats=1) + ("--only", "demo") if quick else (),
                    150.0 if quick else 900.0))
    # The attention path and the loss head alone, variant by variant, beside torch's.
    rows.append(Row("step_ops", "step_ops.py",
                    (*width(heads["t5"]),
                     *_flags(layers=s["layers"], batch=s["batch"],
                             input_length=s["input_length"], target_length=s["target_length"],
                             chunk=s["input_length"] // 4, loss_chunk=s["input_length"] // 4,
                             steps=2 * s["steps"], warmup=s["warmup"])),
                    _cost(s["d_model"], s["d_ff"], 2, s["vocab"], enc_tokens,
                          3 * (2 * s["steps"] + s["warmup"]), 8)))
    vision = VISION[:1] if quick else VISION
    for name, kw in vision:
        if quick:
            kw = {**kw, "image_size": 32, "batch": 2, "num_classes": 10}
        rows.append(Row(f"vision_{name}", "vision_throughput.py",
                        (*_flags(**kw), *(timing if quick else ()), *mem),
                        _cost(512, 2048, 16, 1000, 16 * (4 if quick else 16), 12, 2, memory)))
    # Where each vision step's time goes per op family, beside timm's (one warmup, one timed
    # and one profiled step per side).
    for name, kw in vision:
        if quick:
            kw = {**kw, "image_size": 32, "batch": 2, "num_classes": 10}
        rows.append(Row(f"profile_vision_{name}", "profile_vision.py",
                        (*_flags(**kw), "--steps", "1", "--warmup", "1"),
                        _cost(512, 2048, 16, 1000, 16 * (4 if quick else 16), 3, 2)))
    return rows


def sweep_rows(quick: bool) -> list[Row]:
    """Decoder-only T5.1.1-style rows across widths, both peers, Adafactor (the scaling plot)."""
    s = TINY if quick else REALISTIC
    rows = []
    for d_model, heads, d_ff in (SWEEP_TINY if quick else SWEEP):
        rows.append(Row(f"sweep_decoder_t5_d{d_model}", "train_throughput.py",
                        _flags(arch="t5", d_model=d_model, d_ff=d_ff, heads=heads,
                               head_dim=s["head_dim"], vocab=s["vocab"], layers=s["layers"],
                               batch=s["batch"], length=s["length"], steps=s["steps"],
                               warmup=s["warmup"], optimizer="adafactor"),
                        _cost(d_model, d_ff, s["layers"], s["vocab"], s["batch"] * s["length"],
                              s["steps"] + s["warmup"], 3)))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes: check that rows run")
    p.add_argument("--sweep", action="store_true",
                   help="the d_model sweep of decoder-only rows instead of the side-by-side rows")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-RSS children")
    p.add_argument("--only", action="append", metavar="ROW", help="run only these rows")
    p.add_argument("--out", help="results file (default: benchmarks/results/<UTC date>.jsonl)")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    args = p.parse_args(argv)
    args.rows = (sweep_rows(args.quick) if args.sweep
                 else side_by_side_rows(TINY if args.quick else REALISTIC,
                                        not args.no_memory, args.quick))
    if args.only:
        known = {r.name for r in args.rows}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            p.error(f"unknown row(s) {unknown}; rows in this mode: {sorted(known)}")
        args.rows = [r for r in args.rows if r.name in args.only]
    args.mode = ("quick_" if args.quick else "") + ("sweep" if args.sweep else "side_by_side")
    return args


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def git_commit() -> str | None:
    """HEAD's commit, with '+dirty' when the working tree has changes (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def run_row(row: Row, python: str) -> tuple[int, list[str], list[str]]:
    """Runs one row; its stderr goes on to ours line by line. Returns (exit code, JSON lines
    printed, the last stderr lines).

    Each row gets an empty inductor cache, so that torch.compile's first step is a cold
    compilation like moetx's first jit (torch caches compiled graphs on disk by default,
    across processes; JAX's persistent cache is off unless JAX_COMPILATION_CACHE_DIR is set,
    which `run_all` records)."""
    with tempfile.TemporaryDirectory(prefix="run_all_inductor_") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        return _run(row, python, env)


def _run(row: Row, python: str, env: dict) -> tuple[int, list[str], list[str]]:
    proc = subprocess.Popen(row.command(python), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)
    tail: collections.deque = collections.deque(maxlen=15)

    def forward():
        for line in proc.stderr:
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    t = threading.Thread(target=forward, daemon=True)
    t.start()
    stdout = proc.stdout.read()
    code = proc.wait()
    t.join()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return code, lines, list(tail)


def log(msg: str) -> None:
    print(f"[run_all] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    python = sys.executable
    if args.list:
        for r in args.rows:
            print(f"{r.name}: {shlex.join(['benchmarks/' + r.script, *r.args])}")
        return 0
    out_path = args.out or os.path.join(RESULTS_DIR, time.strftime("%Y-%m-%d", time.gmtime())
                                        + ".jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    commit = git_commit()
    total_cost = sum(r.cost for r in args.rows)
    done_cost = 0.0
    failures = 0
    t0 = time.perf_counter()
    log(f"{len(args.rows)} rows ({args.mode}) -> {out_path}")
    for i, row in enumerate(args.rows, 1):
        elapsed = time.perf_counter() - t0
        eta = (f"ETA {hms(elapsed / done_cost * (total_cost - done_cost))}" if done_cost
               else f"ETA ~{hms(total_cost)}, a guess until a row has run")
        command = shlex.join(["benchmarks/" + row.script, *row.args])
        log(f"row {i}/{len(args.rows)} {row.name}: {command}  (elapsed {hms(elapsed)}, {eta})")
        r0 = time.perf_counter()
        code, lines, tail = run_row(row, python)
        seconds = time.perf_counter() - r0
        meta = {"row": row.name, "mode": args.mode, "command": command, "git_commit": commit,
                "row_seconds": round(seconds, 1), "inductor_cache": "empty per row",
                "jax_compilation_cache_dir": os.environ.get("JAX_COMPILATION_CACHE_DIR")}
        records = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            records.append({**rec, "row": row.name, "run_all": meta})
        if code != 0 or not records:
            failures += 1
            records.append({"benchmark": "run_all_failure", "row": row.name, "run_all": meta,
                            "returncode": code, "stderr_tail": tail,
                            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
            log(f"row {row.name} FAILED (exit {code}); recorded, going on")
        with open(out_path, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        done_cost += row.cost
        log(f"row {i}/{len(args.rows)} {row.name} done in {hms(seconds)}, "
            f"{len(records)} line(s) appended")
    log(f"all {len(args.rows)} rows in {hms(time.perf_counter() - t0)}, {failures} failed; "
        f"results in {out_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
