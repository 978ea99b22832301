#!/usr/bin/env python
"""Training-step throughput of moetx against Hugging Face transformers (torch, CPU), same run.

Both sides train the same T5.1.1-style decoder-only model (RMSNorm, shared relative position
bias, gated-GELU MLP, no biases, untied logits) on the same batch of random token ids, with
Adafactor and a cross entropy + 1e-4 logit z-loss objective:

  moetx  `moetx.trainer.trainer.Trainer.train_step` (jitted, T5X-default Adafactor) on one device.
  HF     `transformers.models.t5.modeling_t5.T5Stack(is_decoder=True)` without its
         cross-attention sublayers, plus an untied `lm_head`, trained with
         `transformers.optimization.Adafactor(scale_parameter=True, relative_step=False,
         warmup_init=False, lr=1e-2)` (moetx's rsqrt schedule gives 1/sqrt(10000) = 1e-2 too).

The two steps are timed alternately (one moetx step, one HF step, ...) after `--warmup` untimed
steps each, so a change in background load hits both sides alike; each reported step time is
the median. The f32 matmul rate of the machine is measured in the same run (JAX and torch,
1024^2 and 2048^2) and JAX's best is the MFU denominator, as in moetx's trainer.

Prints exactly one JSON line on stdout; progress goes to stderr. Example:

  .venv/bin/python benchmarks/train_throughput.py              # tuned XLA CPU flags (default)
  .venv/bin/python benchmarks/train_throughput.py --no_xla_tuning
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import NamedTuple, TextIO

# The peers run torch on the CPU. Triton, which torch imports lazily, segfaults when it loads
# after TensorFlow (which moetx imports); torch on the CPU never needs it. The other benchmarks
# import this module, so this covers them too. See moetx/util/torch_env.py.
from moetx.util import torch_env

torch_env.block_triton_after_tensorflow(force=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults: the `make demo` model (moetx/gin/models/decoder_small.gin) with the 8k vocab.
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--d_ff", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side (compile)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no_xla_tuning", action="store_true",
                   help="do not call moetx.util.xla_env.configure_cpu_defaults()")
    p.add_argument("--skip_hf", action="store_true", help="time moetx only (no peer)")
    args = p.parse_args(argv)
    for name in ("d_model", "layers", "heads", "head_dim", "d_ff", "vocab", "batch", "length",
                 "steps", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step compiles)")
    return args


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[train_throughput {time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr,
          flush=True)


def reserve_stdout_for_json(xla_tuning: bool = True) -> TextIO:
    """Starts a benchmark process; call before importing jax.

    The JSON line(s) are the only stdout output, so C-level and library prints must stay off
    it: returns a line-buffered text stream on the original stdout and points fd 1 and
    `sys.stdout` at stderr. Also quietens TensorFlow's startup log and, with `xla_tuning`,
    applies `moetx.util.xla_env.configure_cpu_defaults()`.
    """
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if xla_tuning:
        from moetx.util import xla_env

        xla_env.configure_cpu_defaults()
    return out


class CpuLoad:
    """CPU time used by *other* processes while a section runs, in cores (Linux /proc/stat):
    a noise indicator, since this machine's cores are shared with other work."""

    def __init__(self):
        self.cores = None  # other processes
        self.own_cores = None  # this process

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return None
        vals = [int(x) for x in fields]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        busy = sum(vals[:8]) - idle  # user nice system idle iowait irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self._b0 = self._busy_seconds()
        self._c0 = time.process_time()
        self._w0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        b1 = self._busy_seconds()
        if self._b0 is not None and b1 is not None:
            wall = time.perf_counter() - self._w0
            own = time.process_time() - self._c0
            self.cores = max(0.0, (b1 - self._b0 - own) / wall)
            self.own_cores = own / wall
        return False


class RoundRobin(NamedTuple):
    """What `time_round_robin` measured, each a dict keyed by the step's name."""

    first: dict  # seconds of the first (compiling) call
    times: dict  # seconds of each timed call, in order
    load: CpuLoad  # CPU load over the timed calls
    first_out: dict  # return value of the first call
    last_out: dict  # return value of the latest call


def time_round_robin(steps: dict, n: int, warmup: int, log, what: str = "steps") -> RoundRobin:
    """Times each of `steps` (name -> no-argument callable) `n` times, round-robin.

    Each callable in turn is first called once, timed alone (it compiles), then `warmup - 1`
    more times untimed; then `n` rounds call each once in order, each call timed, so a change
    in background load hits every step alike. `log` is the calling script's progress logger.
    """
    first, first_out, last_out = {}, {}, {}
    for name, fn in steps.items():
        t0 = time.perf_counter()
        first_out[name] = last_out[name] = fn()
        first[name] = time.perf_counter() - t0
        log(f"{name}: first call (compile) {first[name]:.2f}s")
        for _ in range(warmup - 1):
            last_out[name] = fn()
    times = {name: [] for name in steps}
    log(f"timing {n} {what} of each of {list(steps)} (round-robin)")
    with CpuLoad() as load:
        for _ in range(n):
            for name, fn in steps.items():
                t0 = time.perf_counter()
                last_out[name] = fn()
                times[name].append(time.perf_counter() - t0)
    return RoundRobin(first, times, load, first_out, last_out)


def best_time(fn, reps: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def measure_matmuls(jax, jnp, torch) -> dict[str, float]:
    """f32 n x n matmul FLOP/s (best of a few timed rounds) in JAX and torch."""
    out = {}
    for n in (1024, 2048):
        reps = 8 if n == 1024 else 3
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
        f = jax.jit(lambda x, y: x @ y)
        f(a, b).block_until_ready()
        out[f"jax_{n}"] = 2.0 * n ** 3 / best_time(lambda: f(a, b).block_until_ready(), reps)
        ta, tb = torch.randn(n, n), torch.randn(n, n)
        ta @ tb
        out[f"torch_{n}"] = 2.0 * n ** 3 / best_time(lambda: ta @ tb, reps)
    return out


def make_batch(np, vocab: int, batch: int, length: int) -> dict:
    """One packed segment per row of random ids (never 0, which is padding/BOS)."""
    rng = np.random.default_rng(0)
    targets = rng.integers(1, vocab, size=(batch, length), dtype=np.int32)
    inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "decoder_input_tokens": inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones((batch, length), np.int32),
        "decoder_segment_ids": np.ones((batch, length), np.int32),
        "decoder_positions": np.broadcast_to(np.arange(length, dtype=np.int32),
                                             (batch, length)).copy(),
    }


def build_moetx(args, jax, batch_np):
    from moetx.lm import models, transformer
    from moetx.trainer import metrics, optimizers, partitioning, trainer as trainer_lib

    cfg = transformer.TransformerConfig(
        vocab_size=args.vocab, emb_dim=args.d_model, num_heads=args.heads,
        head_dim=args.head_dim, mlp_dim=args.d_ff, num_decoder_layers=args.layers,
        dropout_rate=0.0, mlp_activations=("gelu", "linear"), logits_via_embedding=False,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dtype="float32")
    # As moetx/gin/models/decoder_tiny.gin: z-loss 1e-4, mean over real target tokens.
    model = models.DecoderOnlyModel(config=cfg, z_loss=1e-4,
                                    loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    # Single device even if the user asked XLA for several host devices.
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tr = trainer_lib.Trainer(model, optimizers.make_optimizer, mesh,
                             partitioning.standard_logical_axis_rules(),
                             model.input_shapes(args.batch, args.length))
    state = tr.init_state()
    batch = tr.to_global(batch_np)
    params = metrics.count_params(state.params)
    flops_per_token = metrics.model_flops_per_token(
        state.params, args.layers, args.heads * args.head_dim, args.length)
    return tr, state, batch, params, flops_per_token


def build_hf(args, torch, batch_np):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5LayerCrossAttention, T5Stack
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=args.vocab, d_model=args.d_model, d_kv=args.head_dim, d_ff=args.d_ff,
        num_layers=args.layers, num_heads=args.heads, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        is_decoder=True, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    stack = T5Stack(config)
    # A decoder T5Block is [self-attention, cross-attention, MLP]. With no encoder the
    # cross-attention is never run (T5Block skips it when encoder_hidden_states is None) but its
    # q/k/v/o and layer norm would still count as (and be updated as) parameters, so drop the
    # sublayer: the block then calls layer[0] and layer[-1] only. The parameter count check
    # below (against moetx's) confirms nothing of it is left.
    for block in stack.block:
        if len(block.layer) == 3 and isinstance(block.layer[1], T5LayerCrossAttention):
            del block.layer[1]
        assert not any(isinstance(m, T5LayerCrossAttention) for m in block.layer)
    lm_head = torch.nn.Linear(args.d_model, args.vocab, bias=False)
    model = torch.nn.ModuleDict({"decoder": stack, "lm_head": lm_head})
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = Adafactor(model.parameters(), lr=1e-2, scale_parameter=True, relative_step=False,
                    warmup_init=False)
    inputs = torch.from_numpy(batch_np["decoder_input_tokens"].astype("int64"))
    targets = torch.from_numpy(batch_np["decoder_target_tokens"].astype("int64"))
    z_loss = 1e-4

    def step():
        opt.zero_grad(set_to_none=True)
        hidden = stack(input_ids=inputs).last_hidden_state
        logits = lm_head(hidden).float()
        # Token cross entropy + z_loss * (log Z)^2, mean over tokens (moetx's objective).
        log_z = torch.logsumexp(logits, dim=-1)
        target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = (log_z - target_logit + z_loss * log_z.square()).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    return step, params, config._attn_implementation


def main(argv=None) -> int:
    args = parse_args(argv)
    xla_flags_before = os.environ.get("XLA_FLAGS", "")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    out = reserve_stdout_for_json(xla_tuning=not args.no_xla_tuning)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    log(f"jax {jax.__version__} ({jax.devices()[0].platform}, {len(jax.devices())} device(s)), "
        f"torch {torch.__version__} ({args.threads} threads); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    log("measuring f32 matmul FLOP/s")
    with CpuLoad() as mm_load:
        mm = measure_matmuls(jax, jnp, torch)
    peak_jax = max(mm["jax_1024"], mm["jax_2048"])
    peak_torch = max(mm["torch_1024"], mm["torch_2048"])

    batch_np = make_batch(np, args.vocab, args.batch, args.length)
    tokens = args.batch * args.length

    log("building moetx")
    tr, state, batch, params, flops_per_token = build_moetx(args, jax, batch_np)
    flops_per_step = flops_per_token * tokens
    hf_step = None
    hf_params = None
    attn_impl = None
    if not args.skip_hf:
        log("building HF T5 decoder stack")
        hf_step, hf_params, attn_impl = build_hf(args, torch, batch_np)
        if hf_params != params:
            log(f"WARNING: parameter counts differ: moetx {params:,} vs HF {hf_params:,}")

    def moetx_step():
        nonlocal state
        state, sums = tr.train_step(state, batch)
        jax.block_until_ready((state, sums))
        return sums

    steps = {"moetx": moetx_step} if hf_step is None else {"moetx": moetx_step, "hf": hf_step}
    timed = time_round_robin(steps, args.steps, args.warmup, log)
    mx_loss = float(timed.last_out["moetx"]["loss"])
    if not np.isfinite(mx_loss):
        raise FloatingPointError(f"moetx loss is {mx_loss}")

    mx_t = statistics.median(timed.times["moetx"])
    result = {
        "benchmark": "train_throughput",
        "model": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                  "head_dim": args.head_dim, "d_ff": args.d_ff, "vocab": args.vocab,
                  "mlp": "gated-gelu", "logits": "untied"},
        "batch": args.batch, "length": args.length, "steps": args.steps,
        "warmup": args.warmup,
        "params": params,
        "hf_params": hf_params,
        "params_match": None if hf_params is None else hf_params == params,
        "model_flops_per_step": flops_per_step,
        "peak_flops_f32_matmul": peak_jax,
        "peak_flops_f32_matmul_torch": peak_torch,
        "matmul_gflops": {k: round(v / 1e9, 1) for k, v in mm.items()},
        "moetx_step_time_s": mx_t,
        "moetx_tokens_per_sec": tokens / mx_t,
        "moetx_mfu": flops_per_step / mx_t / peak_jax,
        "moetx_first_step_s": timed.first["moetx"],
        "moetx_loss": mx_loss,
    }
    if hf_step is not None:
        hf_t = statistics.median(timed.times["hf"])
        result.update({
            "hf_step_time_s": hf_t,
            "hf_tokens_per_sec": tokens / hf_t,
            "hf_mfu": flops_per_step / hf_t / peak_jax,
            "hf_first_step_s": timed.first["hf"],
            "hf_loss": float(timed.last_out["hf"]),
            "hf_attn_implementation": attn_impl,
            "ratio_moetx_over_hf": (tokens / mx_t) / (tokens / hf_t),
        })
    result.update({
        "xla_tuning": not args.no_xla_tuning,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_flags_user": xla_flags_before,
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "jax_version": jax.__version__,
        "torch_version": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        # CPU use (in cores) of other processes during the timed sections (a noise indicator:
        # anything well above 0 means the run shared the cores), and of this process.
        "background_cpu_cores": {"matmul": mm_load.cores, "steps": timed.load.cores},
        "own_cpu_cores_steps": timed.load.own_cores,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    log(f"moetx {tokens / mx_t:,.0f} tok/s ({mx_t * 1e3:.0f} ms/step)"
        + (f", HF {result['hf_tokens_per_sec']:,.0f} tok/s ({result['hf_step_time_s'] * 1e3:.0f}"
           f" ms/step), ratio {result['ratio_moetx_over_hf']:.2f}" if hf_step else ""))
    sys.stdout.flush()
    sys.stderr.flush()
    out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
