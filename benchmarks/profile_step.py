#!/usr/bin/env python
"""Where one encoder-decoder training step spends its time, per op family, moetx beside Hugging
Face (torch, CPU): the same model, batch and objective as `encdec_throughput.py` (read its
docstring), by default at T5.1.1-small's shape.

moetx  One jitted `Trainer.train_step` (forward, backward, Adafactor) under `jax.profiler`. XLA's
       CPU runtime records one trace event per executed thunk (`hlo_op`, the instruction name in
       the compiled module); each instruction is classified by its `op_name` / Python stack
       metadata of the compiled HLO (the Flax module path, e.g. `.../decoder/layers_3/mlp/wi_0`,
       and `transpose(...)` for the backward pass). A fusion counts for the family of its own
       metadata (its root), or of most of its fused instructions when it has none.
HF     One step of `encdec_throughput.py`'s HF step under `torch.profiler`, with a
       `record_function` range around each module of a family (attention, its q/k/v/o
       projections, `compute_bias`, layer norms, MLPs, `lm_head`, `shared`), the loss and the
       optimizer step. Backward ops are attributed to the family of the forward op that created
       their autograd node (`sequence_nr`). Self CPU time of the profiled thread; torch's
       intra-op threads run inside it, so it is wall time.

Families: attention scores + softmax (QK^T, mask/bias add, softmax, AV and the layout copies
around them), attention projections (q/k/v/o), relative position bias, MLP (matmuls and gated
GELU), logits matmul, loss (cross entropy + z-loss, accuracy), embedding (lookup and its
gradient), layer norms, optimizer (Adafactor, grad norm, apply), other (residual adds, masks,
casts, copies not placed by metadata). `host`: step wall time minus the time the ops account
for (JAX: minus the union of thunk intervals; dispatch, Python, executor gaps).

JAX's thunk executor may run independent thunks at once on the 2 cores, so its family times can
add up to more than the step: `share` is of the sum of op times, `concurrency` is that sum over
the union of the op intervals. Also listed: the slowest HLO instructions and op kinds (scatter,
copy, transpose, dot, ...) of the moetx step.

Prints one JSON line (`profile_step`); progress goes to stderr. Examples:

  .venv/bin/python benchmarks/profile_step.py                       # T5.1.1-small shape
  .venv/bin/python benchmarks/profile_step.py --d_model 256 --d_ff 512 --layers 2 --heads 4 \
      --vocab 8192 --batch 4 --input_length 128 --target_length 32  # a quick look
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from encdec_throughput import (add_t5_small_shape_flags, build_hf, make_batch, moetx_config,
                               moetx_encdec_model, moetx_trainer, require_positive)
from train_throughput import (CpuLoad, add_cpu_flags, finish_json_benchmark,
                              start_json_benchmark)

FAMILIES = ("attn_scores_softmax", "attn_projections", "relpos_bias", "mlp", "logits_matmul",
            "loss", "embedding", "layer_norms", "optimizer", "other")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults: T5.1.1-small's shape (issue 16).
    add_t5_small_shape_flags(p)
    p.add_argument("--steps", type=int, default=1,
                   help="timed unprofiled steps, then as many profiled steps, per side")
    p.add_argument("--warmup", type=int, default=1, help="unprofiled steps per side (compile)")
    add_cpu_flags(p)
    p.add_argument("--top", type=int, default=15, help="slowest HLO instructions listed")
    p.add_argument("--skip_hf", action="store_true", help="profile moetx only")
    p.add_argument("--dump_hlo", default=None, help="write the compiled moetx step's HLO here")
    p.add_argument("--trace_dir", default=None, help="keep the JAX trace here (default: a "
                   "temporary directory, deleted)")
    args = p.parse_args(argv)
    require_positive(p, args, "steps", "warmup", "threads")
    return args


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[profile_step {time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------- moetx: HLO metadata
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_OPCODE = re.compile(r"([a-z][a-z0-9_\-]*)\(")  # the first `name(` after the shape


def _stack_tables(text: str) -> dict[int, tuple[str, ...]]:
    """stack_frame_id -> "file:function" of the frame and its callers, from the tables at the
    top of the HLO text (FileNames, FunctionNames, FileLocations, StackFrames; a frame's
    printed `parent_frame_id` is the parent's id + 1, 0 meaning none)."""
    tables, section = collections.defaultdict(dict), None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section is None:
            continue
        m = _TABLE_ROW.match(line)
        if not m:
            if line.startswith(("%", "ENTRY", "HloModule")):
                break
            continue
        tables[section][int(m.group(1))] = m.group(2)
    files = {k: os.path.basename(v.strip('"')) for k, v in tables["FileNames"].items()}
    funcs = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    locs = {}
    for k, v in tables["FileLocations"].items():
        f = re.search(r"file_name_id=(\d+)", v)
        fn = re.search(r"function_name_id=(\d+)", v)
        locs[k] = f"{files.get(int(f.group(1)), '?')}:{funcs.get(int(fn.group(1)), '?')}"
    frames = {}
    for k, v in tables["StackFrames"].items():
        loc = int(re.search(r"file_location_id=(\d+)", v).group(1))
        parent = int(re.search(r"parent_frame_id=(\d+)", v).group(1)) - 1
        frames[k] = (locs.get(loc, "?"), parent)
    chains = {}
    for k in frames:
        chain, f, seen = [], k, set()
        while f > 0 and f in frames and f not in seen:
            seen.add(f)
            chain.append(frames[f][0])
            f = frames[f][1]
        chains[k] = tuple(chain)
    return chains


def parse_hlo(text: str) -> tuple[dict, dict]:
    """instruction name -> (op_name, Python stack "file:function" innermost first, called
    computations, opcode); computation name -> its instruction names."""
    chains = _stack_tables(text)
    instrs, comps, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if not line.startswith((" ", "%", "ENTRY", "ROOT")):
            continue
        m = _INSTR.match(line)
        if m and current is not None and line.startswith(" "):
            name, rest = m.groups()
            op = _OPNAME.search(rest)
            frame = _FRAME.search(rest)
            opcode = _OPCODE.search(rest)
            instrs[name] = (op.group(1) if op else "",
                            chains.get(int(frame.group(1)), ()) if frame else (),
                            _CALLS.findall(rest), opcode.group(1) if opcode else "")
            comps[current].append(name)
            continue
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0].split("(")[0]:
            current = m.group(1)
    return instrs, comps


def classify_jax(op_name: str, stack: tuple[str, ...]) -> str | None:
    """The family of one HLO instruction from its metadata (None: no metadata)."""
    if not op_name and not stack:
        return None
    s = op_name
    where = " ".join(stack)
    if "optimizers.py:" in where or "optax" in where or ":global_norm" in where:
        return "optimizer"
    if "losses.py:" in where or ":_num_correct" in where:
        return "loss"
    if "relpos_bias" in s or "RelativePositionBiases" in where:
        return "relpos_bias"
    if "token_embedder" in s or "Embed.__call__" in where:
        return "embedding"
    if "logits_dense" in s:
        return "logits_matmul"
    if re.search(r"layer_norm|encoder_norm|decoder_norm", s) or "RMSNorm" in where:
        return "layer_norms"
    if "/mlp/" in s or "MlpBlock" in where:
        return "mlp"
    if re.search(r"attention/(query|key|value|out)/", s):
        return "attn_projections"
    if "attention/" in s or "MultiHeadDotProductAttention" in where:
        return "attn_scores_softmax"
    return "other"


def instruction_family(name: str, instrs: dict, comps: dict, classify=classify_jax,
                       depth: int = 0, by_opcode: dict | None = None) -> str:
    """The family of an HLO instruction: `classify(op_name, stack)` of its own metadata, or,
    without metadata, `by_opcode[opcode]` (instructions XLA made in a pass, such as a
    convolution's weight gradient), or the most common family among the instructions of the
    computations it calls (a fusion)."""
    op, stack, calls, opcode = instrs.get(name, ("", (), [], ""))
    fam = classify(op, stack)
    if fam is not None:
        return fam
    if by_opcode and opcode in by_opcode:
        return by_opcode[opcode]
    votes = collections.Counter()
    if depth < 4:
        for comp in calls:
            for inner in comps.get(comp, ()):
                votes[instruction_family(inner, instrs, comps, classify, depth + 1,
                                         by_opcode)] += 1
    votes.pop("other", None)
    return votes.most_common(1)[0][0] if votes else "other"


def is_backward(name: str, instrs: dict, comps: dict) -> bool:
    op, _, calls, _ = instrs.get(name, ("", (), [], ""))
    if op:
        return "transpose(" in op
    return any("transpose(" in instrs.get(i, ("",))[0] for c in calls for i in comps.get(c, ()))


def primitives(per_op: collections.Counter, instrs: dict) -> collections.Counter:
    """Thunk time per JAX primitive, the last part of each instruction's op_name (a fusion's
    own metadata names its root: `erfc`, `conv_general_dilated`, `dot_general`, ...; `?`
    without metadata)."""
    out = collections.Counter()
    for name, us in per_op.items():
        op = instrs.get(name, ("",))[0]
        out[op.rsplit("/", 1)[-1] if op else "?"] += us
    return out


def op_kind(name: str) -> str:
    """`loop_fusion.12` -> `loop_fusion`, `wrapped_scatter` -> `scatter`."""
    kind = re.sub(r"[.\d]+$", "", name).removeprefix("wrapped_")
    return kind or name


def profile_moetx(jax, tr, state, batch, args, families=FAMILIES, classify=classify_jax,
                  by_opcode: dict | None = None) -> tuple[dict, object]:
    """One moetx `Trainer.train_step` under `jax.profiler` (module docstring): thunk time per
    family (`instruction_family` of each HLO instruction), op kinds, slowest ops."""
    compiled = tr._train_step.lower(state, batch).compile()
    text = compiled.as_text()
    if args.dump_hlo:
        with open(args.dump_hlo, "w") as f:
            f.write(text)
    instrs, comps = parse_hlo(text)
    module_name = None

    def step():
        nonlocal state
        state, sums = tr.train_step(state, batch)
        jax.block_until_ready((state, sums))

    for _ in range(args.warmup):
        step()
    plain = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        plain.append(time.perf_counter() - t0)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
    walls = []
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    if not args.trace_dir:
        import shutil

        shutil.rmtree(trace_dir, ignore_errors=True)
    thunks = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    # The train step is the module with the most thunks (init/other jits are not traced here).
    modules = collections.Counter(e["args"].get("hlo_module") for e in thunks)
    module_name = modules.most_common(1)[0][0]
    thunks = [e for e in thunks if e["args"].get("hlo_module") == module_name]
    fam_us = collections.Counter()
    fam_bwd_us = collections.Counter()
    per_op = collections.Counter()
    kinds = collections.Counter()
    intervals = []
    cache = {}
    for e in thunks:
        name = e["args"]["hlo_op"]
        if name not in cache:
            cache[name] = (instruction_family(name, instrs, comps, classify,
                                              by_opcode=by_opcode),
                           is_backward(name, instrs, comps))
        fam, bwd = cache[name]
        dur = float(e["dur"])
        fam_us[fam] += dur
        if bwd:
            fam_bwd_us[fam] += dur
        per_op[name] += dur
        kinds[op_kind(name)] += dur
        intervals.append((float(e["ts"]), float(e["ts"]) + dur))
    intervals.sort()
    union, end = 0.0, -1.0
    for a, b in intervals:
        if b > end:
            union += b - max(a, end)
            end = b
    n = args.steps
    wall_ms = 1e3 * sum(walls) / n
    total_ms = sum(fam_us.values()) / 1e3 / n
    out = {
        "step_wall_ms": round(wall_ms, 1),
        "step_unprofiled_ms": round(1e3 * sum(plain) / n, 1),
        "ops_sum_ms": round(total_ms, 1),
        "ops_union_ms": round(union / 1e3 / n, 1),
        "concurrency": round(sum(fam_us.values()) / max(union, 1e-9), 2),
        "host_ms": round(wall_ms - union / 1e3 / n, 1),
        "families": {f: {"ms": round(fam_us[f] / 1e3 / n, 1),
                         "bwd_ms": round(fam_bwd_us[f] / 1e3 / n, 1),
                         "share": round(fam_us[f] / max(sum(fam_us.values()), 1e-9), 4)}
                     for f in families},
        "op_kinds_ms": {k: round(v / 1e3 / n, 1) for k, v in kinds.most_common(12)},
        "primitives_ms": {k: round(v / 1e3 / n, 1)
                          for k, v in primitives(per_op, instrs).most_common(12)},
        "top_ops": [{"op": k, "family": cache[k][0], "bwd": cache[k][1],
                     "ms": round(v / 1e3 / n, 1),
                     "op_name": instrs.get(k, ("",))[0][-110:]}
                    for k, v in per_op.most_common(args.top)],
        "thunks_per_step": len(thunks) // n,
        "hlo_module": module_name,
    }
    return out, state


# ------------------------------------------------------------------------- HF: torch.profiler
def range_module(torch, module, family: str) -> list:
    """Wraps each forward call of `module` in a `record_function('fam:<family>')` range;
    returns the hooks' handles."""
    rf = torch.autograd.profiler.record_function
    ranges = []

    def pre(mod, inputs):
        r = rf(f"fam:{family}")
        r.__enter__()
        ranges.append(r)

    def post(mod, inputs, output):
        ranges.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def hf_family_hooks(torch, model) -> list:
    """Wraps each module of a family in a `record_function('fam:<family>')` range."""
    from transformers.models.t5 import modeling_t5 as t5

    rf = torch.autograd.profiler.record_function
    handles = []

    def wrap(module, family):
        handles.extend(range_module(torch, module, family))

    for m in model.modules():
        if isinstance(m, t5.T5Attention):
            wrap(m, "attn_scores_softmax")
            for proj in (m.q, m.k, m.v, m.o):
                wrap(proj, "attn_projections")
            if m.has_relative_attention_bias:
                compute_bias = m.compute_bias

                def compute_bias_ranged(*a, _f=compute_bias, **k):
                    with rf("fam:relpos_bias"):
                        return _f(*a, **k)

                m.compute_bias = compute_bias_ranged
        elif isinstance(m, t5.T5LayerNorm):
            wrap(m, "layer_norms")
        elif isinstance(m, (t5.T5DenseGatedActDense, t5.T5DenseActDense)):
            wrap(m, "mlp")
    wrap(model.lm_head, "logits_matmul")
    # The stacks' embed_tokens share `shared`'s weight but may be modules of their own.
    for emb in {id(e): e for e in (model.shared, model.encoder.embed_tokens,
                                   model.decoder.embed_tokens)}.values():
        wrap(emb, "embedding")
    return handles


def attribute_torch(events) -> tuple[collections.Counter, collections.Counter, float]:
    """Self CPU time (us) per family, the backward part of it, and the total."""
    fam_of_seq = {}

    def enclosing_family(ev):
        p = ev
        while p is not None:
            if p.name.startswith("fam:"):
                return p.name[4:]
            p = p.cpu_parent
        return None

    for ev in events:
        seq = getattr(ev, "sequence_nr", -1)
        if seq is not None and seq >= 0 and "evaluate_function" not in ev.name \
                and "Backward" not in ev.name:
            fam = enclosing_family(ev)
            if fam is not None:
                fam_of_seq.setdefault(seq, fam)
    fam_us, bwd_us = collections.Counter(), collections.Counter()
    for ev in events:
        fam, bwd, p = None, False, ev
        while p is not None:
            if p.name.startswith("fam:"):
                fam = p.name[4:]
                break
            if p.name.startswith("autograd::engine::evaluate_function"):
                bwd = True
                fam = fam_of_seq.get(getattr(p, "sequence_nr", -1))
                break
            p = p.cpu_parent
        fam = fam or "other"
        fam_us[fam] += ev.self_cpu_time_total
        if bwd:
            bwd_us[fam] += ev.self_cpu_time_total
    return fam_us, bwd_us, sum(fam_us.values())


def profile_hf(torch, hf_step, args, families=FAMILIES) -> dict:
    """One torch step under `torch.profiler`, its self CPU time per family (`fam:<family>`
    ranges, `attribute_torch`)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(args.warmup):
        hf_step()
    plain = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        hf_step()
        plain.append(time.perf_counter() - t0)
    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            hf_step()
            walls.append(time.perf_counter() - t0)
    fam_us, bwd_us, total = attribute_torch(prof.events())
    by_op = collections.Counter()
    for ev in prof.key_averages():
        by_op[ev.key] += ev.self_cpu_time_total
    n = args.steps
    wall_ms = 1e3 * sum(walls) / n
    return {
        "step_wall_ms": round(wall_ms, 1),
        "step_unprofiled_ms": round(1e3 * sum(plain) / n, 1),
        "ops_sum_ms": round(total / 1e3 / n, 1),
        "host_ms": round(wall_ms - total / 1e3 / n, 1),
        "families": {f: {"ms": round(fam_us[f] / 1e3 / n, 1),
                         "bwd_ms": round(bwd_us[f] / 1e3 / n, 1),
                         "share": round(fam_us[f] / max(total, 1e-9), 4)} for f in families},
        "top_ops": [{"op": k, "ms": round(v / 1e3 / n, 1)}
                    for k, v in by_op.most_common(args.top)],
    }


def family_table(mx: dict, peer: dict | None, peer_key: str, families) -> dict:
    """{family (and 'host'): {'moetx_ms', '<peer_key>_ms'}} of the two sides' profiles."""
    table = {}
    for f in (*families, "host"):
        row = {"moetx_ms": mx["host_ms"] if f == "host" else mx["families"][f]["ms"]}
        if peer is not None:
            row[f"{peer_key}_ms"] = peer["host_ms"] if f == "host" else peer["families"][f]["ms"]
        table[f] = row
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    json_out, _ = start_json_benchmark(args)

    import jax
    import numpy as np

    from moetx.trainer import optimizers

    cfg = moetx_config(args)
    model, input_shapes = moetx_encdec_model(args, cfg)
    batch_np = make_batch(np, args)
    tr = moetx_trainer(jax, model, input_shapes, optimizers.make_optimizer)
    state = tr.init_state()
    params_np = jax.tree_util.tree_map(np.asarray, jax.device_get(state.params))
    batch = tr.to_global(batch_np)
    log("profiling the moetx step")
    with CpuLoad() as mx_load:
        mx, state = profile_moetx(jax, tr, state, batch, args)
    log(f"moetx: {mx['step_wall_ms']:.0f} ms/step")
    del state, tr, batch

    hf = None
    hf_load = None
    if not args.skip_hf:
        import torch
        import transformers
        from transformers.optimization import Adafactor

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(args.threads)
        hf_train = build_hf(torch, cfg, params_np, train=True)
        hf_family_hooks(torch, hf_train)
        opt = Adafactor(hf_train.parameters(), lr=1e-2, scale_parameter=True,
                        relative_step=False, warmup_init=False)
        enc_t = torch.from_numpy(batch_np["encoder_input_tokens"].astype(np.int64))
        dec_in_t = torch.from_numpy(batch_np["decoder_input_tokens"].astype(np.int64))
        targets_t = torch.from_numpy(batch_np["decoder_target_tokens"].astype(np.int64))
        rf = torch.autograd.profiler.record_function

        def hf_step():  # as encdec_throughput.py's, with the loss and optimizer ranges
            with rf("fam:optimizer"):
                opt.zero_grad(set_to_none=True)
            logits = hf_train(input_ids=enc_t, decoder_input_ids=dec_in_t,
                              use_cache=False).logits
            with rf("fam:loss"):
                logits = logits.float()
                log_z = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(-1, targets_t.unsqueeze(-1)).squeeze(-1)
                loss = (log_z - target_logit + 1e-4 * log_z.square()).mean()
            loss.backward()
            with rf("fam:optimizer"):
                opt.step()
            return loss.detach()

        log("profiling the HF step")
        with CpuLoad() as hf_load:
            hf = profile_hf(torch, hf_step, args)
        log(f"HF: {hf['step_wall_ms']:.0f} ms/step")

    table = family_table(mx, hf, "hf", FAMILIES)
    return finish_json_benchmark(json_out, {
        "benchmark": "profile_step",
        "model": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                  "head_dim": args.head_dim, "d_ff": args.d_ff, "vocab": args.vocab},
        "batch": args.batch, "input_length": args.input_length,
        "target_length": args.target_length, "steps": args.steps,
        "table_ms_per_step": table,
        "moetx": mx,
        "hf": hf,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "background_cpu_cores": {"moetx": mx_load.cores,
                                 "hf": hf_load.cores if hf_load else None},
    })


if __name__ == "__main__":
    sys.exit(main())
