#!/usr/bin/env python
"""Mixture-of-Experts training-step throughput: MoE vs dense, dispatch paths, moetx vs HF Switch.

Three measurements in one run, each printed as one self-contained JSON line on stdout (progress
on stderr), all timing full training steps (forward, backward, optimizer: `--optimizer`
adafactor, T5X's defaults with lr 1e-2 from the rsqrt schedule, or adamw, see
train_throughput.py) of `moetx.trainer.trainer.Trainer.train_step` on one device:

1. `moe_vs_dense`: the `moe_primer_small` decoder-only model (moetx/gin/models/
   moe_primer_small.gin: d_model 256, 4 layers, 4 heads x 64, d_ff 512 squared ReLU, Primer
   multi-dconv-head attention, vocab 8192, every 2nd MLP a top-2 MoE of 4 experts, capacity
   factor 1.25, router jitter 1e-2, masked dispatch) against the dense model of equal *active*
   FLOPs: the same config with `moe=None` and one `mlp_dim` for every layer chosen so that the
   dense MLPs do the work of the MoE model's MLPs, where a sparse layer does the work of k
   experts (`--dense_mlp equal_flops`, the default: mlp_dim = d_ff * ((s - 1) + k) / s for
   sparse_every s; with s = 1 that is d_ff * k). `--dense_mlp times_k` gives every layer
   d_ff * k instead (then the dense model does more work than the MoE model when s > 1).
   `overhead_ratio` = MoE step time / dense step time; `model_flops_per_step` of both (from
   `flops_per_step`, which counts experts with k/E) shows how close the FLOPs are. The same
   MoE with scatter dispatch (below) is timed in the same round-robin:
   `overhead_ratio_scatter`.

2. `dispatch_paths`: the same MoE model with `MoeConfig.dispatch` masked (one-hot einsums),
   scatter (index scatter/gather into the same capacity buffers) and dropless (ragged_dot over
   expert-sorted tokens). masked and scatter compute the same function; dropless has no
   capacity, so it drops nothing and its expert matmuls see exactly k * tokens rows, where the
   other two compute E * capacity buffer rows per group (capacity factor 1.25) and drop the
   overflow.

3. `moetx_vs_hf_switch`: a Switch Transformer (top-1) encoder-decoder, by default small:
   d_model 256, 4+4 layers (`--switch_layers`), 4 heads x 64, d_ff 512 ReLU experts and dense
   MLPs, 8 experts (`--switch_experts`) in every 2nd layer of both stacks, vocab 8192, logits
   tied to the embedding (rescaled by d_model^-0.5), batch 8, 128 input and 32 target tokens,
   no dropout, no router jitter, load-balancing loss 1e-2, no router z-loss, token cross
   entropy + 1e-4 logit z-loss. (HF's Switch experts are ungated, hence ReLU rather than
   T5.1.1's gated GELU.)
     moetx  `EncoderDecoderModel` with `MoeConfig(num_selected_experts=1, group_size=
            --input_length)`, so an encoder routing group is one sequence, and moetx's
            default dispatch ('auto': scatter on CPUs; `--switch_dispatch`, recorded resolved
            as `model.moetx_dispatch`).
     HF     `transformers.SwitchTransformersForConditionalGeneration` from
            `moetx.convert.hf.switch_config_to_hf`, loaded with moetx's initial weights
            (`moetx_to_hf_switch`), `expert_capacity` = moetx's capacity of a group of one
            input sequence (max(round(1.25 * input_length / E), 4)), no router jitter; loss =
            cross entropy + 1e-4 logit z-loss + 1e-2 (encoder + decoder load-balancing loss
            from `output_router_logits=True`). Trained eagerly and under `torch.compile`
            (`--peer`; the faster is the `peer`), as in train_throughput.py, which also
            describes `--memory`.
   HF routes every sequence as its own group with one capacity for both stacks; moetx's decoder
   groups hold `group_size` tokens (here 128 / target_length sequences), so the encoders drop
   the same tokens but the decoders may not, and the first losses can differ slightly. Both
   groupings are reported.
   The two sides run different amounts of expert work for the same function. moetx, like T5X
   and flaxformer, computes every slot of its static capacity buffers (experts x capacity rows
   per group, filled or not); HF runs each expert on the tokens routed to it and kept, a
   dynamic shape. `expert_rows` counts both, at the initial weights, beside the routed rows
   (tokens x top-k) that `model_flops_per_step` counts, and `executed_flops_per_step` /
   `*_mfu_executed` put each side's own rows in the FLOPs. `--profile` adds one step of
   moetx and one of HF eager per op family (`profile`: router, dispatch and combine, experts,
   ...).

`--memory` also measures peak RSS in child processes that build one side each and train it 2
steps: moetx's and each HF variant's for `moetx_vs_hf_switch` (`--only_side`), and the MoE and
the dense model for `moe_vs_dense` (`--only_model moe|dense`; `moe_peak_rss_mb`,
`dense_peak_rss_mb` and each over the child's RSS after its imports).

Within each measurement the variants are timed round-robin (one step of each, repeated) after
`--warmup` untimed steps each (compilation), median of `--steps`. The f32 matmul rate of JAX
(and torch) is measured in the same run; JAX's best is the MFU denominator.
`background_cpu_cores` is the CPU other processes used while timing (discard runs well above 0);
`steal_cpu_cores` the part of it the hypervisor took (a virtual machine's cores lent elsewhere).

  .venv/bin/python benchmarks/moe_throughput.py                 # tuned XLA CPU flags (default)
  .venv/bin/python benchmarks/moe_throughput.py --experts 8 --top_k 1 --layers 8
  .venv/bin/python benchmarks/moe_throughput.py --only dispatch_paths --no_xla_tuning
  .venv/bin/python benchmarks/moe_throughput.py --only moetx_vs_hf_switch --d_model 512 \\
      --d_ff 1024 --heads 6 --vocab 32128 --switch_layers 8 --switch_batch 8 \\
      --input_length 512 --target_length 114 --steps 6 --warmup 1 --memory  # T5.1.1-small
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time

# Sibling modules: the side-by-side helpers (flags, optimizers, HF variants, round-robin timing,
# matmul peaks, memory children) and the batches are shared with the dense benchmarks
# (importing them imports neither jax nor torch).
from encdec_throughput import encdec_batch
from train_throughput import (CpuLoad, add_side_by_side_flags, check_finite,
                              check_side_by_side_flags, compile_info, environment_fields,
                              hf_param_count, hf_variants, import_side_libraries, make_batch,
                              matmul_fields, measure_matmuls, memory_child_line,
                              moetx_optimizer_factory, optimizer_settings, peak_rss_mb,
                              reserve_stdout_for_json, run_memory, run_memory_child,
                              side_by_side_fields, time_round_robin, token_loss, torch_optimizer)

MEASUREMENTS = ("moe_vs_dense", "dispatch_paths", "moetx_vs_hf_switch")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Decoder-only MoE model (measurements 1 and 2): moe_primer_small.gin.
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--d_ff", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--experts", type=int, default=4, help="E")
    p.add_argument("--top_k", type=int, default=2, help="k")
    p.add_argument("--sparse_every", type=int, default=2)
    p.add_argument("--group_size", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--dense_mlp", choices=("equal_flops", "times_k"), default="equal_flops")
    # Switch encoder-decoder (measurement 3).
    p.add_argument("--switch_experts", type=int, default=8)
    p.add_argument("--switch_layers", type=int, default=4, help="per stack")
    p.add_argument("--switch_batch", type=int, default=8)
    p.add_argument("--input_length", type=int, default=128)
    p.add_argument("--target_length", type=int, default=32)
    p.add_argument("--switch_dispatch", choices=("auto", "masked", "scatter", "dropless"),
                   default="auto", help="moetx's MoeConfig.dispatch in the Switch row (default: "
                   "moetx's own default, 'auto': scatter on CPUs)")
    # Timing.
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compile)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--only", choices=MEASUREMENTS, action="append",
                   help="run only these measurements (repeatable)")
    p.add_argument("--profile", action="store_true",
                   help="moe_vs_dense and moetx_vs_hf_switch: also profile one step of each "
                        "model (MoE and dense; moetx and HF eager) per op family (router, "
                        "dispatch/combine, experts, ...; `profile` in its line)")
    p.add_argument("--no_xla_tuning", action="store_true",
                   help="do not call moetx.util.xla_env.configure_cpu_defaults()")
    add_side_by_side_flags(p)
    p.add_argument("--only_model", choices=("moe", "dense"),
                   help="(what --memory runs for moe_vs_dense) build and train that model only, "
                        "2 steps, and print its peak RSS line")
    args = p.parse_args(argv)
    for name in ("d_model", "layers", "heads", "head_dim", "d_ff", "vocab", "experts", "top_k",
                 "sparse_every", "group_size", "batch", "length", "switch_experts",
                 "switch_layers", "switch_batch", "input_length", "target_length", "steps",
                 "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.top_k > args.experts:
        p.error("--top_k must be <= --experts")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step compiles)")
    s, k = args.sparse_every, args.top_k
    if args.dense_mlp == "equal_flops" and (args.d_ff * (s - 1 + k)) % s:
        p.error("d_ff * (sparse_every - 1 + k) / sparse_every is not an integer")
    check_side_by_side_flags(p, args)
    if args.switch_layers < 2:
        p.error("--switch_layers must be at least 2 (every 2nd layer is sparse)")
    if args.memory and args.only_model:
        p.error("--memory starts the --only_model children itself; pass one of them, not both")
    if args.only_side and args.only_model:
        p.error("--only_side (moetx_vs_hf_switch) and --only_model (moe_vs_dense) are children "
                "of different measurements; pass one")
    # A memory child runs its own measurement only.
    args.only = (("moetx_vs_hf_switch",) if args.only_side
                 else ("moe_vs_dense",) if args.only_model
                 else tuple(dict.fromkeys(args.only or MEASUREMENTS)))
    return args


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[moe_throughput {time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr,
          flush=True)


class MoetxRunner:
    """A moetx model, its Trainer and state, one batch: `step()` runs one train step."""

    def __init__(self, jax, model, batch_np, input_shapes, optimizer: str = "adafactor"):
        from moetx.trainer import metrics, partitioning, trainer as trainer_lib

        self.jax = jax
        self.model = model
        mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        self.tr = trainer_lib.Trainer(model, moetx_optimizer_factory(optimizer), mesh,
                                      partitioning.standard_logical_axis_rules(), input_shapes)
        self.state = self.tr.init_state()
        self.batch = self.tr.to_global(batch_np)
        self.params = metrics.count_params(self.state.params)
        self.flops_per_step = float(model.flops_per_step(self.state.params, input_shapes))
        self.sums = None
        self.first_loss = None  # loss of the first step (initial parameters)

    def step(self) -> float:
        self.state, self.sums = self.tr.train_step(self.state, self.batch)
        self.jax.block_until_ready((self.state, self.sums))
        if self.first_loss is None:
            self.first_loss = float(self.sums["loss"])
            self.first_sums = self.jax.device_get(self.sums)
        return float(self.sums["loss"])

    def loss(self) -> float:
        return float(self.sums["loss"])


def primer_config(args, moe):
    from moetx.lm import transformer

    return transformer.TransformerConfig(
        vocab_size=args.vocab, emb_dim=args.d_model, num_heads=args.heads,
        head_dim=args.head_dim, mlp_dim=args.d_ff, num_decoder_layers=args.layers,
        dropout_rate=0.0, mlp_activations=("squared_relu",), primer_dconv=True,
        logits_via_embedding=False, dtype="float32", moe=moe)


def moe_config(args, dispatch: str):
    from moetx.moe import layers as moe_layers

    # moe_common.gin + moe_primer_small.gin.
    return moe_layers.MoeConfig(
        num_experts=args.experts, num_selected_experts=args.top_k, dispatch=dispatch,
        train_capacity_factor=1.25, eval_capacity_factor=2.0, min_expert_capacity=4,
        group_size=args.group_size, batch_prioritized_routing=False, jitter_noise=1e-2,
        aux_loss_factor=1e-2, router_z_loss_factor=1e-3, sparse_every=args.sparse_every)


def decoder_model(args, moe=None, mlp_dim=None):
    import dataclasses

    from moetx.lm import models

    cfg = primer_config(args, moe)
    if mlp_dim is not None:
        cfg = dataclasses.replace(cfg, mlp_dim=mlp_dim)
    return models.DecoderOnlyModel(config=cfg, z_loss=1e-4,
                                   loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")


def capacity_info(args, moe, tokens: int) -> dict:
    from moetx.moe import layers as moe_layers, routing

    g, t = moe_layers.num_groups(tokens, moe.group_size)
    c = routing.expert_capacity(t, moe.num_experts, moe.train_capacity_factor,
                                moe.min_expert_capacity)
    return {"groups": g, "tokens_per_group": t, "train_capacity": c,
            "expert_rows_per_layer": g * moe.num_experts * c,
            "routed_rows_per_layer": tokens * moe.num_selected_experts}


def common_fields(args, jax, torch, mm_fields: dict, mm_load, xla_flags_user: str) -> dict:
    return {
        "steps": args.steps, "warmup": args.warmup,
        "optimizer_name": args.optimizer,
        **mm_fields,
        **environment_fields(args, jax, torch, xla_flags_user),
        "background_cpu_cores_matmul": mm_load.cores,
    }


def dense_mlp_dim(args) -> int:
    """The dense model's mlp_dim (`--dense_mlp`, module docstring)."""
    s, k = args.sparse_every, args.top_k
    return args.d_ff * (s - 1 + k) // s if args.dense_mlp == "equal_flops" else args.d_ff * k


def moe_vs_dense_runner(args, jax, np, which: str, dispatch: str = "masked") -> MoetxRunner:
    """The MoE with `dispatch`, or the dense model of equal active FLOPs, on the batch of
    `moe_vs_dense` and `dispatch_paths`."""
    batch_np = make_batch(np, args.vocab, args.batch, args.length)
    shapes = decoder_model(args).input_shapes(args.batch, args.length)
    model = (decoder_model(args, moe_config(args, dispatch)) if which == "moe"
             else decoder_model(args, mlp_dim=dense_mlp_dim(args)))
    return MoetxRunner(jax, model, batch_np, shapes, args.optimizer)


def moe_vs_dense_memory_child(args, jax, np) -> dict:
    """`--only_model`: one model of `moe_vs_dense` built and trained alone (1 + 1 steps); its
    peak RSS line."""
    import moetx.lm.models  # noqa: F401  (what both models import, before the baseline)
    import moetx.moe.layers  # noqa: F401
    import moetx.trainer.trainer  # noqa: F401

    return run_memory_child(
        args.only_model, lambda: moe_vs_dense_runner(args, jax, np, args.only_model).step,
        args.steps, args.warmup, log)


def measure_moe_vs_dense(args, jax, np, runners: dict) -> dict:
    dense_mlp = dense_mlp_dim(args)
    log(f"building MoE (masked and scatter dispatch) and dense (mlp_dim {dense_mlp}) models")
    moe = runners.get("masked") or moe_vs_dense_runner(args, jax, np, "moe")
    runners["masked"] = moe
    # The same MoE with index dispatch (the same function: first losses equal), where XLA's
    # CPU runs the one-hot dispatch/combine einsums as real matmuls.
    scatter = runners.get("scatter") or moe_vs_dense_runner(args, jax, np, "moe", "scatter")
    runners["scatter"] = scatter
    dense = moe_vs_dense_runner(args, jax, np, "dense")
    first, times, load, *_ = time_round_robin(
        {"moe": moe.step, "moe_scatter": scatter.step, "dense": dense.step}, args.steps,
        args.warmup, log)
    tokens = args.batch * args.length
    tm, td = statistics.median(times["moe"]), statistics.median(times["dense"])
    ts = statistics.median(times["moe_scatter"])
    mcfg = moe.model.config.moe
    return {
        "benchmark": "moe_vs_dense",
        "model": {"shape": "moe_primer_small", "d_model": args.d_model, "layers": args.layers,
                  "heads": args.heads, "head_dim": args.head_dim, "d_ff": args.d_ff,
                  "vocab": args.vocab, "mlp": "squared_relu", "primer_dconv": True,
                  "experts": args.experts, "top_k": args.top_k,
                  "sparse_every": args.sparse_every,
                  "group_size": args.group_size, "capacity_factor": 1.25,
                  "dispatch": "masked"},
        "dense_model": {"moe": None, "mlp_dim": dense_mlp, "rule": args.dense_mlp},
        "batch": args.batch, "length": args.length,
        "capacity": capacity_info(args, mcfg, tokens),
        "moe_params": moe.params, "dense_params": dense.params,
        "moe_model_flops_per_step": moe.flops_per_step,
        "dense_model_flops_per_step": dense.flops_per_step,
        "flops_ratio_moe_over_dense": moe.flops_per_step / dense.flops_per_step,
        "moe_step_time_s": tm, "dense_step_time_s": td,
        "moe_tokens_per_sec": tokens / tm, "dense_tokens_per_sec": tokens / td,
        "overhead_ratio": tm / td,
        "moe_scatter_step_time_s": ts, "moe_scatter_tokens_per_sec": tokens / ts,
        "overhead_ratio_scatter": ts / td,
        "moe_scatter_mfu": scatter.flops_per_step / ts / args.peak,
        "moe_scatter_first_step_s": first["moe_scatter"],
        "moe_scatter_first_loss": scatter.first_loss,
        "moe_mfu": moe.flops_per_step / tm / args.peak,
        "dense_mfu": dense.flops_per_step / td / args.peak,
        "moe_first_step_s": first["moe"], "dense_first_step_s": first["dense"],
        "moe_first_loss": moe.first_loss, "dense_first_loss": dense.first_loss,
        "moe_fraction_dropped": _dropped(moe),
        "background_cpu_cores": load.cores, "own_cpu_cores": load.own_cores,
        "steal_cpu_cores": load.steal_cores,
        **({"profile": profile_moe_vs_dense(jax, {"moe": moe, "dense": dense})}
           if args.profile else {}),
    }


# Op families of the MoE-vs-dense profile.
MOE_FAMILIES = ("attention", "mlp", "router", "dispatch_combine", "experts", "logits_loss",
                "layer_norms", "optimizer", "other")
_DISPATCH_COMBINE = ("gtd,gtec->gecd", "gecd,gtec->gtd")


def classify_moe(op_name: str, stack: tuple[str, ...]) -> str | None:
    """The family of one HLO instruction of a train step (decoder-only or encoder-decoder,
    dense or MoE, masked or scatter dispatch) from its metadata (`op_name`: the Flax module
    path; the Python stack); None without metadata."""
    if not op_name and not stack:
        return None
    where = " ".join(stack)
    if "optimizers.py:" in where or ":global_norm" in where:
        return "optimizer"
    # A tied head's logits are the embedding's `attend`.
    if ("losses.py:" in where or "logits_dense" in op_name or "token_embedder.attend" in op_name
            or ":_num_correct" in where):
        return "logits_loss"
    if any(e in op_name for e in _DISPATCH_COMBINE):
        return "dispatch_combine"
    if "/router/" in op_name or "routing.py:" in where:
        return "router"
    if "/expert/" in op_name or "._experts/" in op_name or "ExpertsMlp" in where:
        return "experts"
    if "._scatter/" in op_name:
        return "dispatch_combine"  # scatter dispatch: index scatters, gathers and the combine
    if re.search(r"layer_norm|encoder_norm|decoder_norm", op_name) or "RMSNorm" in where:
        return "layer_norms"
    if "/mlp/" in op_name or "MlpBlock" in where:
        return "mlp"  # dense MLPs, and the MoE layers' grouping reshapes and transposes
    if "attention/" in op_name or "MultiHeadDotProductAttention" in where:
        return "attention"
    return "other"


def profile_moe_vs_dense(jax, runners: dict) -> dict:
    """One step of each runner under `jax.profiler`, time per `MOE_FAMILIES` family
    (`profile_step.profile_moetx`), after one warm step."""
    from profile_step import profile_moetx

    settings = argparse.Namespace(warmup=1, steps=1, top=10, trace_dir=None, dump_hlo=None)
    out = {}
    for name, r in runners.items():
        log(f"profiling the {name} step")
        out[name], r.state = profile_moetx(jax, r.tr, r.state, r.batch, settings, MOE_FAMILIES,
                                           classify_moe)
    return out


def _dropped(runner) -> float | None:
    """Mean over sparse layers of the sown fraction of tokens left behind (no expert at all),
    at the first step (initial parameters, so every variant sees the same router)."""
    vals = [float(v) for k, v in runner.first_sums.items() if k.endswith("/fraction_dropped")]
    return sum(vals) / len(vals) if vals else None


def measure_dispatch_paths(args, jax, np, runners: dict) -> dict:
    for d in ("masked", "scatter", "dropless"):
        if d not in runners:
            log(f"building MoE model, dispatch={d}")
            runners[d] = moe_vs_dense_runner(args, jax, np, "moe", d)
    paths = ("masked", "scatter", "dropless")
    first, times, load, *_ = time_round_robin({d: runners[d].step for d in paths}, args.steps,
                                               args.warmup, log)
    tokens = args.batch * args.length
    med = {d: statistics.median(times[d]) for d in paths}
    return {
        "benchmark": "dispatch_paths",
        "model": {"shape": "moe_primer_small", "d_model": args.d_model, "layers": args.layers,
                  "d_ff": args.d_ff, "vocab": args.vocab, "experts": args.experts,
                  "top_k": args.top_k, "sparse_every": args.sparse_every,
                  "group_size": args.group_size, "capacity_factor": 1.25},
        "batch": args.batch, "length": args.length,
        "capacity": capacity_info(args, runners["masked"].model.config.moe, tokens),
        "params": runners["masked"].params,
        "note": "dropless has no capacity: nothing is dropped and its expert matmuls see "
                "k*tokens rows (ragged_dot); masked/scatter compute E*capacity rows per group "
                "and drop overflow, so dropless's loss differs; masked and scatter first-step "
                "losses should agree",
        **{f"{d}_step_time_s": med[d] for d in paths},
        **{f"{d}_tokens_per_sec": tokens / med[d] for d in paths},
        **{f"{d}_first_step_s": first[d] for d in paths},
        **{f"{d}_first_loss": runners[d].first_loss for d in paths},
        **{f"{d}_fraction_dropped": _dropped(runners[d]) for d in paths},
        "ratio_scatter_over_masked": med["scatter"] / med["masked"],
        "ratio_dropless_over_masked": med["dropless"] / med["masked"],
        "background_cpu_cores": load.cores, "own_cpu_cores": load.own_cores,
    }


def build_hf_switch(torch, cfg, params_np, capacity: int):
    """SwitchTransformersForConditionalGeneration of `cfg` in train mode, with moetx's initial
    weights `params_np` (None: HF's own initialisation, for the memory child)."""
    import numpy as np
    import transformers

    from moetx.convert import hf

    torch.manual_seed(0)
    hf_cfg = hf.switch_config_to_hf(cfg, expert_capacity=capacity)
    hf_cfg.use_cache = False
    model = transformers.SwitchTransformersForConditionalGeneration(hf_cfg)
    if params_np is not None:
        sd = hf.moetx_to_hf_switch(params_np, cfg)
        # The converter leaves out the tied copies of the embedding (as save_pretrained does);
        # a strict load wants them.
        copies = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
        if cfg.logits_via_embedding:
            copies.append("lm_head.weight")
        sd.update({k: sd["shared.weight"] for k in copies})
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                               for k, v in sd.items()}, strict=True)
    return model.train()


def switch_loss_fn(torch, batch_np, aux_loss_factor: float, profiled: bool = False):
    """`loss_of(model)`: cross entropy + 1e-4 logit z-loss + aux_loss_factor * (encoder +
    decoder load-balancing loss), as moetx's objective. `profiled`: the token loss runs in a
    `fam:logits_loss` range (`profile_switch`)."""
    enc = torch.from_numpy(batch_np["encoder_input_tokens"].astype("int64"))
    dec_in = torch.from_numpy(batch_np["decoder_input_tokens"].astype("int64"))
    targets = torch.from_numpy(batch_np["decoder_target_tokens"].astype("int64"))

    def loss_of(model):
        out = model(input_ids=enc, decoder_input_ids=dec_in, output_router_logits=True,
                    use_cache=False)
        with (torch.autograd.profiler.record_function("fam:logits_loss") if profiled
              else contextlib.nullcontext()):
            loss = token_loss(torch, out.logits, targets)
        return loss + aux_loss_factor * (out.encoder_aux_loss + out.decoder_aux_loss)

    return loss_of


def hf_switch_family_hooks(torch, model) -> list:
    """`fam:<family>` ranges (`MOE_FAMILIES`) around the modules of an HF Switch model: the
    experts module's own work (index selects and adds) is dispatch and combine, the expert MLPs
    inside it are experts, the other MLPs are dense; returns the hooks' handles."""
    from profile_step import range_module
    from transformers.models.switch_transformers import modeling_switch_transformers as st

    families = {st.SwitchTransformersAttention: "attention",
                st.SwitchTransformersLayerNorm: "layer_norms",
                st.SwitchTransformersTop1Router: "router",
                st.SwitchTransformersExperts: "dispatch_combine",
                st.SwitchTransformersDenseActDense: "mlp"}
    expert_mlps = {id(e) for m in model.modules()
                   if isinstance(m, st.SwitchTransformersExperts) for e in m.values()}
    handles = []
    for m in model.modules():
        family = "experts" if id(m) in expert_mlps else families.get(type(m))
        if family:
            handles.extend(range_module(torch, m, family))
    handles.extend(range_module(torch, model.lm_head, "logits_loss"))
    return handles


def hf_switch_expert_rows(torch, model, loss_of) -> int:
    """Rows the expert MLPs of an HF Switch model compute in one forward pass: the tokens
    routed to an expert and kept within its capacity (HF runs each expert on those rows only,
    where moetx's capacity buffers hold experts x capacity rows per group, filled or not)."""
    from transformers.models.switch_transformers import modeling_switch_transformers as st

    rows = []

    def count(module, inputs, output):
        rows.append(int(inputs[1].sum()))  # selected_experts: one-hot, zeroed when dropped

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, st.SwitchTransformersExperts)]
    with torch.no_grad():
        loss_of(model)
    for h in handles:
        h.remove()
    return sum(rows)


def profile_switch(args, jax, torch, mx, cfg, params_np, capacity: int, batch_np,
                   aux_loss_factor: float) -> dict:
    """One step of moetx's and of HF eager's Switch model under each profiler, time per
    `MOE_FAMILIES` family (`profile_step.profile_moetx` / `profile_hf`), after one warm step;
    HF's model starts from the same initial weights."""
    from profile_step import profile_hf, profile_moetx

    settings = argparse.Namespace(warmup=1, steps=1, top=10, trace_dir=None, dump_hlo=None)
    log("profiling the moetx Switch step")
    out = {}
    out["moetx"], mx.state = profile_moetx(jax, mx.tr, mx.state, mx.batch, settings,
                                           MOE_FAMILIES, classify_moe)
    model = build_hf_switch(torch, cfg, params_np, capacity)
    handles = hf_switch_family_hooks(torch, model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, clip = torch_optimizer(torch, args.optimizer, params)
    loss_of = switch_loss_fn(torch, batch_np, aux_loss_factor, profiled=True)
    rf = torch.autograd.profiler.record_function

    def step():
        with rf("fam:optimizer"):
            opt.zero_grad(set_to_none=True)
        loss = loss_of(model)
        loss.backward()
        with rf("fam:optimizer"):
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
        return float(loss.detach())

    log("profiling the HF eager Switch step")
    out["hf_eager"] = profile_hf(torch, step, settings, MOE_FAMILIES)
    for h in handles:
        h.remove()
    return out


def measure_switch(args, jax, np, torch, mm_fields: dict | None) -> dict:
    """The moetx-vs-HF Switch line; with `--only_side`, the memory child's line instead."""
    from moetx.lm import models, transformer
    from moetx.moe import layers as moe_layers, routing

    b, n, t = args.switch_batch, args.input_length, args.target_length
    E = args.switch_experts
    moe = moe_layers.MoeConfig(
        num_experts=E, num_selected_experts=1, dispatch=args.switch_dispatch,
        train_capacity_factor=1.25, eval_capacity_factor=2.0, min_expert_capacity=4,
        group_size=n, jitter_noise=0.0, aux_loss_factor=1e-2, router_z_loss_factor=0.0,
        batch_prioritized_routing=False, sparse_every=2)
    cfg = transformer.TransformerConfig(
        vocab_size=args.vocab, emb_dim=args.d_model, num_heads=args.heads,
        head_dim=args.head_dim, mlp_dim=args.d_ff, num_encoder_layers=args.switch_layers,
        num_decoder_layers=args.switch_layers, dropout_rate=0.0, mlp_activations=("relu",),
        logits_via_embedding=True, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, dtype="float32", moe=moe)
    model = models.EncoderDecoderModel(config=cfg, z_loss=1e-4,
                                       loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    batch_np = encdec_batch(np, args.vocab, b, n, t)
    shapes = model.input_shapes(b, {"inputs": n, "targets": t})
    capacity = routing.expert_capacity(n, E, 1.25, 4)  # a group of one input sequence
    import_side_libraries()
    baseline_mb = peak_rss_mb()
    steps, fallbacks = {}, {}
    mx = params_np = hf_params = attn_impl = hf_sparse = None
    if args.only_side != "hf":
        log("building moetx Switch encoder-decoder")
        mx = MoetxRunner(jax, model, batch_np, shapes, args.optimizer)
        steps["moetx"] = mx.step
        if not args.only_side:
            params_np = jax.tree_util.tree_map(np.asarray, jax.device_get(mx.state.params))
    if args.only_side != "moetx":
        log(f"building HF SwitchTransformersForConditionalGeneration (expert_capacity "
            f"{capacity}, {args.peer})")
        hf_steps, fallbacks = hf_variants(
            torch, lambda: build_hf_switch(torch, cfg, params_np, capacity),
            switch_loss_fn(torch, batch_np, moe.aux_loss_factor), args.optimizer, args.peer)
        steps.update(hf_steps)
        hf_model = next(iter(hf_steps.values())).model
        hf_params = hf_param_count(hf_model)
        attn_impl = hf_model.config._attn_implementation
        hf_sparse = {"encoder": [i for i, blk in enumerate(hf_model.encoder.block)
                                 if blk.is_sparse],
                     "decoder": [i for i, blk in enumerate(hf_model.decoder.block)
                                 if blk.is_sparse]}
        del hf_model
        if mx is not None and hf_params != mx.params:
            log(f"WARNING: parameter counts differ: moetx {mx.params:,} vs HF {hf_params:,}")
    timed = time_round_robin(steps, args.steps, args.warmup, log, fallbacks=fallbacks)
    if args.only_side:  # a memory child: losses recorded, not checked (train_throughput's doc)
        return memory_child_line(args.only_side, args.peer if args.only_side == "hf" else None,
                                 baseline_mb, timed)
    check_finite(timed)
    mx_sparse = {s: [i for i in range(args.switch_layers) if moe.is_sparse(i)]
                 for s in ("encoder", "decoder")}
    tokens = b * (n + t)
    groups = {"encoder": capacity_info(args, moe, b * n),
              "decoder": capacity_info(args, moe, b * t)}
    rows = {what: sum(groups[s][f"{what}_rows_per_layer"] * len(mx_sparse[s]) for s in groups)
            for what in ("expert", "routed")}
    # The initial weights route as in each side's first step.
    hf_rows = hf_switch_expert_rows(torch, build_hf_switch(torch, cfg, params_np, capacity),
                                    switch_loss_fn(torch, batch_np, moe.aux_loss_factor))
    # Forward and backward of one row through one expert's wi and wo.
    row_flops = 6 * 2 * args.d_model * args.d_ff
    executed = {"moetx": mx.flops_per_step + (rows["expert"] - rows["routed"]) * row_flops,
                "hf": mx.flops_per_step + (hf_rows - rows["routed"]) * row_flops}
    profile = (profile_switch(args, jax, torch, mx, cfg, params_np, capacity, batch_np,
                              moe.aux_loss_factor) if args.profile else None)
    result = {
        "benchmark": "moetx_vs_hf_switch",
        "model": {"d_model": args.d_model, "encoder_layers": args.switch_layers,
                  "decoder_layers": args.switch_layers, "heads": args.heads,
                  "head_dim": args.head_dim, "d_ff": args.d_ff, "mlp": "relu",
                  "vocab": args.vocab, "experts": E, "top_k": 1, "sparse_every": 2,
                  "logits": "tied", "capacity_factor": 1.25, "jitter": 0.0,
                  "moetx_dispatch": moe_layers.resolve_dispatch(moe)},
        "batch": b, "input_length": n, "target_length": t,
        "tokens_per_step": tokens,
        "optimizer": optimizer_settings(args.optimizer),
        "peer_modes": args.peer,
        "sparse_layers_moetx": mx_sparse, "sparse_layers_hf": hf_sparse,
        "moetx_groups": groups,
        "hf_expert_capacity": capacity,
        "hf_groups": f"one per sequence ({n} encoder / {t} decoder tokens), capacity "
                     f"{capacity} in both stacks",
        "moetx_params": mx.params, "hf_params": hf_params,
        "params_match": hf_params == mx.params,
        "weights_shared": True,
        "model_flops_per_step": mx.flops_per_step,
        **side_by_side_fields(timed, tokens, mx.flops_per_step, mm_fields),
        "moetx_fraction_dropped": _dropped(mx),
        "expert_rows": {"routed": rows["routed"], "moetx": rows["expert"], "hf": hf_rows,
                        "note": "expert MLP rows a step computes, both stacks: routed = tokens "
                                "x top-k (what model_flops_per_step counts); moetx = experts x "
                                "capacity per group, filled or not; hf = the routed tokens kept "
                                "within capacity, at the initial weights"},
        "executed_flops_per_step": executed,
        **({"profile": profile} if profile else {}),
        "hf_attn_implementation": attn_impl, "threads": args.threads,
        "background_cpu_cores": timed.load.cores, "own_cpu_cores": timed.load.own_cores,
        "steal_cpu_cores": timed.load.steal_cores,
    }
    # MFU of the work each side runs: the model FLOPs with each side's expert rows.
    peak = mm_fields["peak_flops_f32_matmul"]
    result["moetx_mfu_executed"] = executed["moetx"] / result["moetx_step_time_s"] / peak
    if "peer" in result:
        result["peer_mfu_executed"] = executed["hf"] / result["peer_step_time_s"] / peak
    if "hf_compile" in steps:
        result["hf_compile"] = compile_info(torch)
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    xla_flags_before = os.environ.get("XLA_FLAGS", "")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out = reserve_stdout_for_json(xla_tuning=not args.no_xla_tuning)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    log(f"jax {jax.__version__}, torch {torch.__version__}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; measurements {list(args.only)}; "
        f"optimizer {args.optimizer}, peer {args.peer}"
        + (f", only {args.only_side}" if args.only_side else ""))
    if args.only_side:
        out.write(json.dumps(measure_switch(args, jax, np, torch, None)) + "\n")
        out.close()
        return 0
    if args.only_model:
        out.write(json.dumps(moe_vs_dense_memory_child(args, jax, np)) + "\n")
        out.close()
        return 0
    log("measuring f32 and bf16 matmul FLOP/s")
    with CpuLoad() as mm_load:
        mm = measure_matmuls(jax, jnp, torch)
    mm_fields = matmul_fields(mm)
    args.peak = mm_fields["peak_flops_f32_matmul"]
    common = common_fields(args, jax, torch, mm_fields, mm_load, xla_flags_before)

    runners: dict = {}
    for name in args.only:
        if name == "moe_vs_dense":
            result = measure_moe_vs_dense(args, jax, np, runners)
            log(f"MoE {result['moe_step_time_s'] * 1e3:.0f} ms vs dense "
                f"{result['dense_step_time_s'] * 1e3:.0f} ms: overhead "
                f"{result['overhead_ratio']:.2f}")
            if args.memory:
                runners.pop("masked", None)
                run_memory(result, args, argv, os.path.abspath(__file__), xla_flags_before, log,
                           children=[(m, ["--only_model", m]) for m in ("moe", "dense")])
        elif name == "dispatch_paths":
            result = measure_dispatch_paths(args, jax, np, runners)
            log("dispatch " + ", ".join(f"{d} {result[f'{d}_step_time_s'] * 1e3:.0f} ms"
                                        for d in ("masked", "scatter", "dropless")))
        else:
            runners.clear()  # free the decoder-only models
            result = measure_switch(args, jax, np, torch, mm_fields)
            log(f"Switch: moetx {result['moetx_tokens_per_sec']:,.0f} tok/s, peer "
                f"{result['peer']} {result['peer_tokens_per_sec']:,.0f} tok/s, ratio "
                f"{result['ratio_moetx_over_peer']:.2f}")
            if args.memory:
                run_memory(result, args, argv, os.path.abspath(__file__), xla_flags_before, log)
        for key in ("moe_first_loss", "dense_first_loss", "masked_first_loss"):
            if key in result and not np.isfinite(result[key]):
                raise FloatingPointError(f"{key} is {result[key]}")
        result.update(common)
        result["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        sys.stderr.flush()
        out.write(json.dumps(result) + "\n")
        out.flush()
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
