#!/usr/bin/env python
"""The README's benchmark table and scaling plot, generated from run_all.py's results.

Reads one or more results files (JSON lines, as `benchmarks/run_all.py` appends them; a later
line of the same row replaces an earlier one) and prints a markdown table with one line per
benchmark row: moetx's throughput, the peer's (for the HF training rows the faster of HF eager
and HF under torch.compile, chosen here from the raw figures), their ratio, MFU, first-step
time and peak RSS of both, followed by a caption naming the sources, dates and matmul peaks.

  --write README.md   also replace the text between `<!-- bench-table:start -->` and
                      `<!-- bench-table:end -->` in that file with the table (nothing else in
                      the file changes; a missing marker is an error).
                      A `profile_step` line (run_all.py's `profile_encdec` row) also
                      becomes the per-op-family table between `<!-- profile-table:start -->`
                      and `<!-- profile-table:end -->`, and a `means` line (means.py,
                      the `means` row) the table between `<!-- means-table:start -->` and
                      `<!-- means-table:end -->`, and a `step_ops` line (step_ops.py,
                      the `step_ops` row) the attention and loss-head tables between
                      `<!-- ops-table:start -->` and `<!-- ops-table:end -->`, and the
                      `profile_vision` lines (profile_vision.py, the `profile_vision_*`
                      rows) one per-op-family table each, moetx beside timm, between
                      `<!-- vision-profile-table:start -->` and `<!-- ...:end -->`; a
                      `moe_vs_dense` line with a profile (`--profile`) the MoE step beside
                      the dense one per op family, between `<!-- moe-profile-table:... -->`;
                      a `moetx_vs_hf_switch` line with a profile moetx's Switch step beside
                      HF eager's, between `<!-- switch-profile-table:... -->`.
  --plot PATH.png     also draw tokens/s and MFU against d_model for moetx and the peer, from
                      the `--sweep` rows (`sweep_*`) in the results.

The table needs only the standard library (and moetx.util.markdown); the plot needs matplotlib.

  .venv/bin/python benchmarks/readme_table.py benchmarks/results/2026-12-05.jsonl
  .venv/bin/python benchmarks/readme_table.py benchmarks/results/*.jsonl --write README.md \\
      --plot docs/bench_scaling.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, NamedTuple

from moetx.util import markdown

START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"
PROFILE_START = "<!-- profile-table:start -->"
PROFILE_END = "<!-- profile-table:end -->"
MEANS_START = "<!-- means-table:start -->"
MEANS_END = "<!-- means-table:end -->"
OPS_START = "<!-- ops-table:start -->"
OPS_END = "<!-- ops-table:end -->"
MOE_PROFILE_START = "<!-- moe-profile-table:start -->"
MOE_PROFILE_END = "<!-- moe-profile-table:end -->"
SWITCH_PROFILE_START = "<!-- switch-profile-table:start -->"
SWITCH_PROFILE_END = "<!-- switch-profile-table:end -->"
INPUT_START = "<!-- input-pipeline-table:start -->"
INPUT_END = "<!-- input-pipeline-table:end -->"
CACHE_START = "<!-- compile-cache-table:start -->"
CACHE_END = "<!-- compile-cache-table:end -->"
VISION_PROFILE_START = "<!-- vision-profile-table:start -->"
VISION_PROFILE_END = "<!-- vision-profile-table:end -->"
DASH = "–"

# The HF training variants, as named in the JSON lines, and how the table names them.
HF_VARIANTS = {"hf_eager": "HF eager", "hf_compile": "HF torch.compile"}


class TableRow(NamedTuple):
    """One line of the table; numbers are None where a benchmark has no such figure."""

    label: str
    optimizer: str
    unit: str  # "tok/s" or "img/s"
    moetx: float
    peer_label: str
    peer: float
    mfu_moetx: float | None
    mfu_peer: float | None
    first_moetx: float | None
    first_peer: float | None
    rss_moetx: float | None
    rss_peer: float | None

    @property
    def ratio(self) -> float:
        """moetx's throughput over the peer's."""
        return self.moetx / self.peer

    @property
    def ceiling(self) -> float | None:
        """The ratio moetx would reach if its whole step ran at the f32 matmul peak of the
        same run: the peer's step time over the model FLOPs' time at that peak, which is one
        over the peer's MFU (None where the line has no peer MFU)."""
        return 1.0 / self.mfu_peer if self.mfu_peer else None


# ------------------------------------------------------------------------------- reading
def load_results(paths: Iterable[str]) -> list[dict]:
    """Every JSON line of the files, in order (blank lines skipped)."""
    records = []
    for path in paths:
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON line ({e.msg})") from None
                rec.setdefault("_source", os.path.basename(path))
                records.append(rec)
    return records


def _identity(rec: dict) -> tuple:
    """Which measurement a line is: its run_all row and benchmark, or (for lines run by hand)
    the benchmark and its shape."""
    if "row" in rec:
        return rec["row"], rec.get("benchmark")
    shape = {k: rec.get(k) for k in ("model", "arch", "batch", "length", "input_length",
                                     "target_length", "image_size", "optimizer")}
    return None, rec.get("benchmark"), json.dumps(shape, sort_keys=True)


def latest(records: list[dict]) -> list[dict]:
    """One line per measurement, the latest, in the order each measurement first appeared."""
    order, by_id = [], {}
    for rec in records:
        key = _identity(rec)
        if key not in by_id:
            order.append(key)
        by_id[key] = rec
    return [by_id[k] for k in order]


def is_profile(rec: dict) -> bool:
    """A line with a table of its own (profile_step.py's, profile_vision.py's, means.py's,
    step_ops.py's), not a row of the main table."""
    return rec.get("benchmark") in ("profile_step", "profile_vision", "means", "step_ops",
                                    "input_pipeline", "compile_cache")


def is_sweep(rec: dict) -> bool:
    return str(rec.get("row", "")).startswith("sweep_") or str(
        rec.get("run_all", {}).get("mode", "")).endswith("sweep")


def choose_peer(rec: dict) -> tuple[str, str] | None:
    """(field prefix, table label) of the faster HF variant of a training line, by tokens/s.
    Lines from before the eager/compile split have a single `hf_*` peer."""
    found = {name: rec[f"{name}_tokens_per_sec"] for name in HF_VARIANTS
             if rec.get(f"{name}_tokens_per_sec") is not None}
    if not found:
        return ("hf", "HF eager") if rec.get("hf_tokens_per_sec") is not None else None
    best = max(found, key=found.get)
    label = HF_VARIANTS[best]
    if best == "hf_eager" and rec.get("hf_compile_error"):
        label += " (compile failed)"
    return best, label


def _optimizer(rec: dict) -> str:
    opt = rec.get("optimizer")
    if isinstance(opt, dict):
        return opt.get("name", DASH)
    return rec.get("optimizer_name") or opt or "adafactor"


def _shape(rec: dict) -> str:
    m = rec.get("model", {})
    d = m.get("d_model")
    if "input_length" in rec:
        return (f"d {d}, {m.get('encoder_layers')}+{m.get('decoder_layers')} layers, "
                f"{rec.get('batch')} × {rec.get('input_length')}→{rec.get('target_length')}")
    return f"d {d}, {m.get('layers')} layers, {rec.get('batch')} × {rec.get('length')}"


# The MoE dispatches a `moe_vs_dense` line may time, and the prefix of each one's fields.
MOE_DISPATCH_KEYS = {"masked": "moe", "scatter": "moe_scatter"}


def to_row(rec: dict) -> TableRow | None:
    """The table line of one JSON line, or None for lines the table does not show."""
    kind = rec.get("benchmark")
    opt = _optimizer(rec)
    if kind in ("train_throughput", "encdec_train_throughput", "moetx_vs_hf_switch"):
        peer = choose_peer(rec)
        if peer is None:
            return None
        p, peer_label = peer
        m = rec.get("model", {})
        if kind == "train_throughput":
            arch = ("Llama (RoPE, SwiGLU)" if rec.get("arch", m.get("arch")) == "llama"
                    else "T5.1.1")
            label = f"Decoder-only {arch} ({_shape(rec)})"
        elif kind == "encdec_train_throughput":
            label = f"T5.1.1 enc-dec ({_shape(rec)})"
        else:
            dispatch = m.get("moetx_dispatch")
            label = (f"Switch enc-dec, {m.get('experts')} experts top-{m.get('top_k', 1)}"
                     f"{f', {dispatch} dispatch' if dispatch else ''} ({_shape(rec)})")
        rss_peer = rec.get(f"{p}_peak_rss_mb", rec.get("hf_peak_rss_mb"))
        return TableRow(label, opt, "tok/s", rec["moetx_tokens_per_sec"], peer_label,
                        rec[f"{p}_tokens_per_sec"], rec.get("moetx_mfu"), rec.get(f"{p}_mfu"),
                        rec.get("moetx_first_step_s"), rec.get(f"{p}_first_step_s"),
                        rec.get("moetx_peak_rss_mb"), rss_peer)
    if kind == "encdec_decode_throughput":
        return TableRow(f"Greedy decode, T5.1.1 enc-dec ({_shape(rec)})", DASH, "tok/s",
                        rec["moetx_generated_tokens_per_sec"], "HF generate",
                        rec["hf_generated_tokens_per_sec"], None, None,
                        rec.get("moetx_first_call_s"), rec.get("hf_first_call_s"),
                        rec.get("moetx_peak_rss_mb"), rec.get("hf_peak_rss_mb"))
    if kind == "moe_vs_dense":
        m = rec.get("model", {})
        # Lines that also time the scatter dispatch show the faster of the two and name the
        # other's step time over the dense step's.
        rate = {d: rec.get(f"{k}_tokens_per_sec") for d, k in MOE_DISPATCH_KEYS.items()}
        timed = [d for d, r in rate.items() if r is not None]
        dispatch = max(timed, key=lambda d: rate[d])
        key = MOE_DISPATCH_KEYS[dispatch]
        how = "".join(f", {dispatch} dispatch ({d}: step "
                      f"{rec['dense_tokens_per_sec'] / rate[d]:.2f}× dense)"
                      for d in timed if d != dispatch)
        label = (f"MoE top-{m.get('top_k')} of {m.get('experts')}{how} vs dense of equal "
                 f"FLOPs, decoder ({_shape(rec)})")
        return TableRow(label, opt, "tok/s", rec[f"{key}_tokens_per_sec"], "moetx dense",
                        rec["dense_tokens_per_sec"], rec.get(f"{key}_mfu"), rec.get("dense_mfu"),
                        rec.get(f"{key}_first_step_s"), rec.get("dense_first_step_s"),
                        rec.get("moe_peak_rss_mb"), rec.get("dense_peak_rss_mb"))
    if kind == "vision_throughput":
        label = (f"Vision {rec.get('model')} ({rec.get('image_size')}², "
                 f"batch {rec.get('batch')})")
        return TableRow(label, "sgd", "img/s", rec["moetx_images_per_sec"], "timm",
                        rec["timm_images_per_sec"], rec.get("moetx_mfu"), rec.get("timm_mfu"),
                        rec.get("moetx_first_step_s"), rec.get("timm_first_step_s"),
                        rec.get("moetx_peak_rss_mb"), rec.get("timm_peak_rss_mb"))
    return None


# ------------------------------------------------------------------------------ rendering
def _rate(v: float, unit: str) -> str:
    return f"{v:,.0f} {unit}" if v >= 100 else f"{v:,.1f} {unit}"


def _pair(a: float | None, b: float | None, fmt: str, suffix: str = "") -> str:
    if a is None and b is None:
        return DASH
    f = lambda x: DASH if x is None else format(x, fmt)  # noqa: E731
    return f"{f(a)} / {f(b)}{suffix}"


HEADER = ("| benchmark | optimizer | moetx | peer | moetx / peer "
          "| moetx / peer at the f32 peak | MFU moetx / peer | first step moetx / peer "
          "| peak RSS moetx / peer |")
RULE = "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"


def render_row(r: TableRow) -> str:
    cells = [r.label, r.optimizer, _rate(r.moetx, r.unit),
             f"{r.peer_label}: {_rate(r.peer, r.unit)}", f"{r.ratio:.2f}×",
             DASH if r.ceiling is None else f"{r.ceiling:.2f}×",
             _pair(r.mfu_moetx, r.mfu_peer, ".1%"), _pair(r.first_moetx, r.first_peer, ".1f", " s"),
             _pair(r.rss_moetx, r.rss_peer, ",.0f", " MiB")]
    return "| " + " | ".join(cells) + " |"


def caption(records: list[dict]) -> str:
    """What the table was made from: files, dates, mode, matmul peaks, background load,
    failed rows."""
    sources = sorted({rec.get("_source", "?") for rec in records})
    dates = sorted(rec["date"] for rec in records if rec.get("date"))
    f32 = [rec["peak_flops_f32_matmul"] / 1e9 for rec in records
           if rec.get("peak_flops_f32_matmul")]
    bf16 = [rec["peak_flops_bf16_matmul"] / 1e9 for rec in records
            if rec.get("peak_flops_bf16_matmul")]
    loads = []
    for rec in records:
        bg = rec.get("background_cpu_cores")
        loads += [v for v in (bg.values() if isinstance(bg, dict) else [bg]) if v is not None]
    def span(xs: list[float]) -> str:
        lo, hi = f"{min(xs):,.0f}", f"{max(xs):,.0f}"
        return lo if lo == hi else f"{lo}–{hi}"

    parts = [f"Generated by `benchmarks/readme_table.py` from {', '.join(sources)}"
             + (f" ({dates[0]} to {dates[-1]})" if dates else "") + "."]
    if any(str(rec.get("run_all", {}).get("mode", "")).startswith("quick") for rec in records):
        parts.append("Quick mode: tiny shapes, a check that the rows run, not a measurement.")
    parts.append("Peer: the faster of Hugging Face eager and under `torch.compile` (inductor), "
                 "timed round-robin with moetx in the same run.")
    if f32:
        parts.append(f"MFU: model FLOPs per second over the fastest f32 matmul measured in the "
                     f"same run ({span(f32)} GFLOP/s"
                     + (f"; bf16: {span(bf16)} GFLOP/s" if bf16 else "") + ").")
        parts.append("moetx / peer at the f32 peak: the ratio moetx would reach if its whole step "
                     "ran at that matmul's speed, one over the peer's MFU. A float32 step that "
                     "executes the model FLOPs beats the peer by more only if it runs faster "
                     "than the fastest bare matmul measured here.")
    baselines = [v for rec in records for v in (rec.get("rss_baseline_mb") or {}).values()]
    if baselines:
        parts.append("Peak RSS: each side alone in a child process (2 steps) that first imports "
                     "the libraries of both sides (moetx's bring TensorFlow through SeqIO), "
                     f"{span(baselines)} MiB before any model is built.")
    arena = [(rec.get("row") or rec.get("benchmark"), rec["moetx_malloc_arena_max_8_peak_rss_mb"],
              rec["moetx_peak_rss_mb"]) for rec in records
             if rec.get("moetx_malloc_arena_max_8_peak_rss_mb") and rec.get("moetx_peak_rss_mb")]
    if arena:
        parts.append("moetx's peak RSS with `MALLOC_ARENA_MAX=8` set, which turns its allocator "
                     "setting (freed heap kept for reuse) off, against as shipped: "
                     + ", ".join(f"{off:,.0f} / {on:,.0f} MiB ({row})" for row, off, on in arena)
                     + ".")
    if loads:
        parts.append(f"Background load while timing: up to {max(loads):.2f} cores.")
    # A row failed when its last line is a failure; a later successful run of it supersedes.
    last_failed: dict[str, bool] = {}
    for rec in records:
        if "row" in rec or rec.get("benchmark") == "run_all_failure":
            last_failed[rec.get("row", "?")] = rec.get("benchmark") == "run_all_failure"
    failed = [row for row, f in last_failed.items() if f]
    if failed:
        parts.append(f"Failed rows (see the results file): {', '.join(failed)}.")
    return " ".join(parts)


def make_table(records: list[dict]) -> str:
    """The markdown table (sweep rows excluded) and its caption. Lines are in the order their
    run_all row first appeared (a row that failed and then ran keeps its place; the lines of one
    row stay together); a line run by hand keeps its own place."""
    first_seen: dict = {}
    for i, rec in enumerate(records):
        first_seen.setdefault(rec.get("row", ("line", id(rec))), i)
    current = [rec for rec in latest(records) if not is_sweep(rec) and not is_profile(rec)]
    current.sort(key=lambda rec: first_seen[rec.get("row", ("line", id(rec)))])
    rows = [r for r in (to_row(rec) for rec in current) if r is not None]
    if not rows:
        raise ValueError("no benchmark rows in the results (run benchmarks/run_all.py first)")
    return "\n".join([HEADER, RULE, *map(render_row, rows), "", caption(current)])


# Op families of profile_step.py, as the profile table names them.
FAMILY_LABELS = {
    "attn_scores_softmax": "attention scores + softmax (QKᵀ, mask and bias add, softmax, AV)",
    "attn_projections": "attention projections (q, k, v, o)",
    "relpos_bias": "relative position bias",
    "mlp": "MLP (gated GELU)",
    "logits_matmul": "logits matmul",
    "loss": "loss (cross entropy, z-loss, accuracy)",
    "embedding": "embedding (lookup and its gradient)",
    "layer_norms": "layer norms",
    "optimizer": "optimizer (Adafactor, update)",
    "other": "other (residuals, masks, casts, copies)",
    "host": "host (step wall time not covered by ops)",
}


def _encdec_shape(rec: dict) -> str:
    m = rec["model"]
    return (f"d_model {m['d_model']}, {m['layers']}+{m['layers']} layers, {m['heads']} heads × "
            f"{m['head_dim']}, d_ff {m['d_ff']}, vocab {m['vocab']:,}, batch {rec['batch']} × "
            f"({rec['input_length']} → {rec['target_length']})")


def _with_caption(lines: list[str], caption: str, rec: dict) -> str:
    """A table's lines and its caption (noting a quick-mode line), as markdown."""
    if str(rec.get("run_all", {}).get("mode", "")).startswith("quick"):
        caption += " Quick mode: tiny shapes, a check that the row runs, not a measurement."
    return "\n".join([*lines, "", caption])


def _family_table(mx: dict, peer: dict | None, labels: dict, peer_name: str,
                  name: str = "moetx", gap: str | None = None) -> list[str]:
    """Per-family ms per step and share of op time, one side (`name`) beside the other
    (`peer_name`), and the gap."""
    gap = gap or f"{name} − {peer_name}"
    out = [f"| op family | {name} ms/step | {name} share | {peer_name} ms/step | {peer_name} "
           f"share | {gap} ms |", "| --- | --- | --- | --- | --- | --- |"]

    def cell(side: dict | None, fam: str, what: str) -> float | None:
        if side is None:
            return None
        if fam == "host":
            return side["host_ms"] if what == "ms" else None
        return side["families"][fam][what]

    for fam, label in labels.items():
        a, b = cell(mx, fam, "ms"), cell(peer, fam, "ms")
        sa, sb = cell(mx, fam, "share"), cell(peer, fam, "share")
        out.append("| " + " | ".join([
            label, format(a, ",.0f"), DASH if sa is None else format(sa, ".1%"),
            DASH if b is None else format(b, ",.0f"), DASH if sb is None else format(sb, ".1%"),
            DASH if b is None else format(a - b, "+,.0f")]) + " |")
    return out


def _walls(mx: dict, peer: dict | None, peer_name: str, name: str = "moetx") -> str:
    wall = f"{name} {mx['step_wall_ms']:,.0f} ms a profiled step ({mx['step_unprofiled_ms']:,.0f}" \
           f" unprofiled)"
    if peer is not None:
        wall += f", {peer_name} {peer['step_wall_ms']:,.0f} ({peer['step_unprofiled_ms']:,.0f})"
    return wall


def _thunk_note(mx: dict) -> str:
    kinds = ", ".join(f"{k} {v:,.0f}" for k, v in list(mx.get("op_kinds_ms", {}).items())[:6])
    return (f"moetx's op times are XLA thunks, which may run two at once on the 2 cores (op time "
            f"/ busy time {mx.get('concurrency', float('nan')):.2f}), so its column can add up to "
            f"more than its step; `host` is the step's wall time outside every op. moetx's "
            f"costliest op kinds (ms): {kinds}.")


def best_of_both(a: dict, b: dict) -> tuple[float, dict[str, str]]:
    """The step made of the faster side's time in every op family, host time included: its ms,
    and which side ("a" or "b") each family's time came from.

    A side's op times are first divided by its `concurrency` (op time over busy time; 1 where
    the line has none): XLA runs two thunks at once on two cores, so its families add up to
    more than its step, and divided they add up to its busy time. Families are as each
    profiler sorted the ops, so the sum bounds what matching the faster library's kernels op
    family by op family would give, not what a kernel faster than both would.
    """
    scale_a, scale_b = (1.0 / side.get("concurrency", 1.0) for side in (a, b))
    total, picks = min(a["host_ms"], b["host_ms"]), {}
    for fam in a["families"]:
        ms_a, ms_b = a["families"][fam]["ms"] * scale_a, b["families"][fam]["ms"] * scale_b
        total += min(ms_a, ms_b)
        picks[fam] = "a" if ms_a <= ms_b else "b"
    return total, picks


def _best_of_both_note(a: dict, b: dict, peer_name: str, flops: float | None = None,
                       peak: float | None = None, peak_from: str = "this line's") -> str:
    """A caption's sentence on `best_of_both`: that step against the peer's profiled step, and
    its MFU where the model FLOPs and the f32 matmul peak are known."""
    ms, _ = best_of_both(a, b)
    note = (f" Best of both: the faster side's time in every family (each side's op times "
            f"divided by its op time / busy time where it reports one, as moetx's XLA thunks "
            f"do) makes a step of {ms:,.0f} ms, "
            f"{b['step_wall_ms'] / ms:.2f}× {peer_name}'s profiled step")
    if flops and peak:
        note += (f" and {flops / (ms / 1e3) / peak:.1%} MFU at {peak_from} f32 matmul peak "
                 f"({peak / 1e9:,.0f} GFLOP/s)")
    return note + "."


def _model_flops_and_peak(records: list[dict], benchmark: str, model: str
                          ) -> tuple[float | None, float | None]:
    """The model FLOPs per step and the f32 matmul peak of the latest `benchmark` line of
    `model` that holds both; (None, None) without one."""
    for rec in reversed(latest(records)):
        if (rec.get("benchmark") == benchmark and rec.get("model") == model
                and rec.get("model_flops_per_step") and rec.get("peak_flops_f32_matmul")):
            return rec["model_flops_per_step"], rec["peak_flops_f32_matmul"]
    return None, None


def make_profile_table(records: list[dict]) -> str | None:
    """The per-op-family table of the latest `profile_step` line (ms per step, moetx beside
    HF eager, with each side's share of its op time) and its caption; None without one."""
    lines = [rec for rec in latest(records) if rec.get("benchmark") == "profile_step"]
    if not lines:
        return None
    rec = lines[-1]
    mx, hf = rec["moetx"], rec.get("hf")
    out = _family_table(mx, hf, FAMILY_LABELS, "HF eager", gap="moetx − HF")
    caption = (
        f"Generated by `benchmarks/readme_table.py` from the `profile_step` line of "
        f"{rec.get('_source', '?')} ({rec.get('date', '?')}): `benchmarks/profile_step.py`, "
        f"T5.1.1 enc-dec {_encdec_shape(rec)}, Adafactor, one step per side under each "
        f"profiler. {_walls(mx, hf, 'HF eager')}. {_thunk_note(mx)}")
    if hf is not None:
        caption += _best_of_both_note(mx, hf, "HF eager")
    return _with_caption(out, caption, rec)


# profile_vision.py's op families, as the vision profile tables name them.
VISION_FAMILY_LABELS = {
    "conv": "convolutions (dense, 1×1 included)",
    "depthwise_conv": "depthwise convolutions",
    "norm": "batch and layer norms",
    "attention": "attention / token mixing (projections included)",
    "squeeze_excite": "squeeze-excite, self-gating",
    "dense": "dense layers (MLP, head)",
    "drop_path": "dropout and drop path (random bits included)",
    "loss": "loss (softmax cross entropy)",
    "optimizer": "optimizer (SGD, momentum, update)",
    "other": "other (activations, residuals, pooling, pads, copies)",
    "host": "host (step wall time not covered by ops)",
}


def make_vision_profile_tables(records: list[dict]) -> str | None:
    """One per-op-family table per `profile_vision` line (each model's latest), moetx beside
    timm, each with its caption; None without one."""
    lines = [rec for rec in latest(records) if rec.get("benchmark") == "profile_vision"]
    if not lines:
        return None
    tables = []
    for rec in lines:
        mx, tm = rec["moetx"], rec.get("timm")
        title = (f"**{rec['model']}** ({rec['image_size']}², batch {rec['batch']}, SGD; timm "
                 f"`{rec.get('timm_model')}`): {_walls(mx, tm, 'timm')}.")
        prims = ", ".join(f"{k} {v:,.0f}"
                          for k, v in list(mx.get("primitives_ms", {}).items())[:8])
        caption = (
            f"Generated by `benchmarks/readme_table.py` from the `profile_vision` line of "
            f"{rec.get('_source', '?')} ({rec.get('date', '?')}): "
            f"`benchmarks/profile_vision.py`, one step per side under each profiler. "
            f"{_thunk_note(mx)}" + (f" By JAX primitive (ms; `?`: XLA-made, no metadata): "
                                    f"{prims}." if prims else ""))
        if tm is not None:
            flops, peak = _model_flops_and_peak(records, "vision_throughput", rec["model"])
            caption += _best_of_both_note(mx, tm, "timm", flops, peak,
                                          "the model's latest throughput line's")
        tables.append("\n".join([title, "", _with_caption(
            _family_table(mx, tm, VISION_FAMILY_LABELS, "timm"), caption, rec)]))
    return "\n\n".join(tables)


# moe_throughput.py's MoE-vs-dense profile families, as the MoE profile table names them.
MOE_FAMILY_LABELS = {
    "attention": "attention (with Primer's depthwise convolutions)",
    "mlp": "dense MLPs (and the MoE layers' reshapes)",
    "router": "router (logits, top-k, capacity masks)",
    "dispatch_combine": "dispatch and combine einsums",
    "experts": "expert MLPs",
    "logits_loss": "logits and loss",
    "layer_norms": "layer norms",
    "optimizer": "optimizer",
    "other": "other (residuals, embedding, copies)",
    "host": "host (step wall time not covered by ops)",
}


def _latest_profiled(records: list[dict], benchmark: str) -> dict | None:
    """The latest line of `benchmark` that holds a profile (`--profile`); None without one."""
    lines = [rec for rec in latest(records)
             if rec.get("benchmark") == benchmark and rec.get("profile")]
    return lines[-1] if lines else None


def make_moe_profile_table(records: list[dict]) -> str | None:
    """The per-op-family table of the latest `moe_vs_dense` line that holds a profile (MoE
    step beside the dense step of equal active FLOPs) and its caption; None without one."""
    rec = _latest_profiled(records, "moe_vs_dense")
    if rec is None:
        return None
    moe, dense = rec["profile"]["moe"], rec["profile"]["dense"]
    m = rec.get("model", {})
    caption = (
        f"Generated by `benchmarks/readme_table.py` from the `moe_vs_dense` line of "
        f"{rec.get('_source', '?')} ({rec.get('date', '?')}): `benchmarks/moe_throughput.py "
        f"--only moe_vs_dense --profile`, decoder ({_shape(rec)}), top-{m.get('top_k')} of "
        f"{m.get('experts')} experts ({m.get('dispatch', 'masked')} dispatch) in one layer of "
        f"every {m.get('sparse_every')}, against "
        f"the dense model of equal active FLOPs, one step each under `jax.profiler`. "
        f"{_walls(moe, dense, 'dense', name='MoE')}. {_thunk_note(moe)}")
    return _with_caption(_family_table(moe, dense, MOE_FAMILY_LABELS, "dense", name="MoE"),
                         caption, rec)


# moe_throughput.py's Switch profile families (MOE_FAMILIES), as the Switch table names them.
SWITCH_FAMILY_LABELS = {
    "attention": "attention (projections, scores, softmax)",
    "mlp": "dense MLPs (and the MoE layers' reshapes)",
    "router": "router (logits, top-1, capacity masks)",
    "dispatch_combine": "dispatch and combine (moetx: index scatters and gathers; HF: index "
                        "selects and adds)",
    "experts": "expert MLPs",
    "logits_loss": "logits (tied) and loss",
    "layer_norms": "layer norms",
    "optimizer": "optimizer",
    "other": "other (residuals, embedding, copies)",
    "host": "host (step wall time not covered by ops)",
}


def make_switch_profile_table(records: list[dict]) -> str | None:
    """The per-op-family table of the latest `moetx_vs_hf_switch` line that holds a profile
    (moetx's Switch step beside HF eager's), with the expert rows each side computes, and its
    caption; None without one."""
    rec = _latest_profiled(records, "moetx_vs_hf_switch")
    if rec is None:
        return None
    mx, hf = rec["profile"]["moetx"], rec["profile"]["hf_eager"]
    m, rows = rec.get("model", {}), rec.get("expert_rows", {})
    caption = (
        f"Generated by `benchmarks/readme_table.py` from the `moetx_vs_hf_switch` line of "
        f"{rec.get('_source', '?')} ({rec.get('date', '?')}): `benchmarks/moe_throughput.py "
        f"--only moetx_vs_hf_switch --profile`, Switch enc-dec ({_shape(rec)}), top-1 of "
        f"{m.get('experts')} experts ({m.get('moetx_dispatch', '?')} dispatch in moetx) in one "
        f"layer of every {m.get('sparse_every')}, {rec.get('optimizer', {}).get('name')}, one "
        f"step per side under each profiler. {_walls(mx, hf, 'HF eager')}. Expert MLP rows a "
        f"step (both stacks, at the initial weights): {rows.get('routed', 0):,} routed "
        f"(what the MFU's model FLOPs count), moetx {rows.get('moetx', 0):,} (every slot of "
        f"its capacity buffers), HF {rows.get('hf', 0):,} (the routed tokens kept within "
        f"capacity). {_thunk_note(mx)}")
    caption += _best_of_both_note(mx, hf, "HF eager", rec.get("model_flops_per_step"),
                                  rec.get("peak_flops_f32_matmul"))
    return _with_caption(_family_table(mx, hf, SWITCH_FAMILY_LABELS, "HF eager",
                                       gap="moetx − HF"), caption, rec)


# means.py's variants, as the means table names them.
MEANS_LABELS = {
    "baseline": "as shipped (float32, no remat, unrolled layers)",
    "bf16": "bfloat16 activations (`ACTIVATION_DTYPE = 'bfloat16'`)",
    "remat_full": "rematerialise every layer (`remat_policy = 'full'`)",
    "remat_save_dots": "rematerialise but keep matmul outputs (`'save_dots'`)",
    "scan": "scanned layers (`scan_layers = True`)",
    "no_donation": "no buffer donation (`Trainer(donate_state=False)`)",
    "baseline_again": "as shipped, measured again last",
}


def _seconds(s: float) -> str:
    return f"{s:.2f}" if s >= 1 else f"{s:.3g}"


def make_means_table(records: list[dict]) -> str | None:
    """The table of the latest `means` line (one variant per row: s/step, speed-up over the
    mean of the two baseline runs, MFU, first step, XLA's peak memory estimate where the line
    has it, last loss) and its caption; None without one."""
    lines = [rec for rec in latest(records) if rec.get("benchmark") == "means"]
    if not lines:
        return None
    rec = lines[-1]
    has_memory = any("memory" in v for v in rec["variants"].values())
    out = ["| variant | s/step | tokens/s | vs as shipped | MFU (f32 / bf16 peak) "
           "| first step |" + (" XLA's peak estimate |" if has_memory else "")
           + " loss after the steps |",
           "| --- | --- | --- | --- | --- | --- |" + (" --- |" if has_memory else "") + " --- |"]
    for name, v in rec["variants"].items():
        memory = []
        if has_memory:
            peak = v.get("memory", {}).get("peak_bytes_estimate")
            memory = [f"{peak / 2**20:,.0f} MiB" if peak is not None else "–"]
        out.append("| " + " | ".join([
            MEANS_LABELS.get(name, name), _seconds(v["seconds_per_step"]),
            _rate(v["tokens_per_sec"], "tok/s").removesuffix(" tok/s"),
            f"{v['speedup_vs_baseline']:.2f}×", f"{v['mfu_f32']:.1%} / {v['mfu_bf16']:.1%}",
            f"{v['first_step_s']:.1f} s", *memory, f"{v['loss_last']:.4f}"]) + " |")
    caption = (
        f"Generated by `benchmarks/readme_table.py` from the `means` line of "
        f"{rec.get('_source', '?')} ({rec.get('date', '?')}): `benchmarks/means.py`, moetx's "
        f"T5.1.1 enc-dec step at {_encdec_shape(rec)}, "
        f"{rec.get('optimizer', {}).get('name', 'adafactor')}; each variant compiled, warmed up "
        f"and timed for {rec['steps']} steps (median) from the same weights on the same batch, "
        f"one after another in one process. The speed-up is over the mean of the two as-shipped "
        f"runs, which differ by {abs(rec['baseline_drift'] - 1):.1%} (the machine's drift "
        f"during the run). Scanned layers draw their initial weights from other random "
        f"streams, so their loss differs from the others'. "
        + ("XLA's peak estimate is the compiled step's memory plan: arguments + outputs + "
           "temporaries - the bytes donated arguments share with outputs. " if has_memory
           else "")
        + "Matmul peaks measured in the same run: f32 "
        f"{rec['peak_flops_f32_matmul'] / 1e9:,.0f}, bf16 "
        f"{rec['peak_flops_bf16_matmul'] / 1e9:,.0f} GFLOP/s.")
    return _with_caption(out, caption, rec)


# How the input-pipeline tables name input_pipeline.py's objectives and setups.
INPUT_LABELS = {
    "causal_lm": "causal LM",
    "prefix_lm": "prefix LM",
    "span_corruption": "span corruption",
    "demo_moe_primer": "`make demo` (MoE-Primer decoder, 16 × 128, causal LM)",
    "demo_t5": "`make demo MODEL=t5` (enc-dec, 16 × (128 → 32), span corruption)",
}


def _lengths(lengths: dict) -> str:
    return " → ".join(str(lengths[k]) for k in ("inputs", "targets") if k in lengths)


def make_input_pipeline_table(records: list[dict]) -> str | None:
    """The packing and prefetch tables of the latest `input_pipeline` line and their caption;
    None without one."""
    lines = [rec for rec in latest(records) if rec.get("benchmark") == "input_pipeline"]
    if not lines:
        return None
    rec = lines[-1]
    out = []
    if "packing" in rec:
        out += ["| objective (lengths) | loss tokens a batch, packed | not packed | packing's "
                "gain | positions filled, packed / not |", "| --- | --- | --- | --- | --- |"]
        for name, row in rec["packing"].items():
            p, u = row["packed"], row["unpacked"]
            filled = f"{p['decoder_filled']:.0%} / {u['decoder_filled']:.0%}"
            if "encoder_filled" in p:
                filled = (f"decoder {filled}; encoder {p['encoder_filled']:.0%} / "
                          f"{u['encoder_filled']:.0%}")
            out.append(f"| {INPUT_LABELS.get(name, name)} ({_lengths(row['feature_lengths'])}) "
                       f"| {p['loss_tokens']:,.0f} | {u['loss_tokens']:,.0f} "
                       f"| {row['loss_tokens_ratio']:.2f}× | {filled} |")
    if "prefetch" in rec:
        if out:
            out.append("")
        out += ["| job | prefetch | ms/step | input ms/step | other CPU (cores) | vs none |",
                "| --- | --- | --- | --- | --- | --- |"]
        for name, row in rec["prefetch"].items():
            means = row["mean"]
            none = means[min(means, key=int)]["seconds_per_step"]
            for value, m in means.items():
                out.append(
                    f"| {INPUT_LABELS.get(name, name)} | {value} "
                    f"| {m['seconds_per_step'] * 1e3:,.0f} "
                    f"| {m['input_seconds_per_step'] * 1e3:.1f} "
                    f"| {m['other_cpu_cores']:.2f} | {none / m['seconds_per_step']:.2f}× |")
    caption = (
        f"Generated by `benchmarks/readme_table.py` from the `input_pipeline` line of "
        f"{rec.get('_source', '?')} ({rec.get('date', '?')}): `benchmarks/input_pipeline.py`. ")
    if "packing" in rec:
        caption += (
            f"Packing: the first {rec['batches']} batches of {rec['batch']} rows of the shuffled "
            f"bundled-corpus train split through the trainer's input pipeline, packed (the "
            f"default) and not (`DatasetConfig.pack = False`); a step costs the same either "
            f"way, so the gain is in trained tokens per second. ")
    if "prefetch" in rec:
        order = next((row["order"] for row in rec["prefetch"].values() if "order" in row), None)
        order = (f"in the order {', '.join(map(str, order))}" if order
                 else "alternating, without prefetching first each time")
        caption += (
            f"Prefetch: `DatasetConfig.prefetch` batches prepared ahead by tf.data, each value "
            f"trained {rec['repeats']} times for {rec['steps']} steps ({order}), figures "
            f"past the first {rec['log_every']}-step window (it holds the compilation); input "
            f"ms/step is the host's time getting and placing a batch while the step before "
            f"runs.")
    return _with_caption(out, caption.rstrip(), rec)


# How the compile-cache table names compile_cache.py's setups.
CACHE_LABELS = {
    "demo": "`make demo` (MoE-Primer decoder, 16 × 128)",
    "t5_small": "T5.1.1-small (scanned, 8 × (512 → 114))",
}


def make_compile_cache_table(records: list[dict]) -> str | None:
    """Time to the first step, cold and warm compilation cache, from the latest
    `compile_cache` line, and its caption; None without one."""
    lines = [rec for rec in latest(records) if rec.get("benchmark") == "compile_cache"]
    if not lines:
        return None
    rec = lines[-1]
    out = ["| job | cache | init + state (s) | first step (s) | to the first step | whole "
           "command (s) |", "| --- | --- | --- | --- | --- | --- |"]
    for name, row in rec["setups"].items():
        for kind in ("cold", "warm"):
            m = row["mean"][kind]
            gain = f"{row['first_step_speedup']:.1f}× sooner" if kind == "warm" else DASH
            out.append(f"| {CACHE_LABELS.get(name, name)} | {kind} "
                       f"| {m['init_or_restore_s']:.1f} | {m['compilation_s']:.1f} | {gain} "
                       f"| {m['command_s']:.1f} |")
    other = [r["other_cpu_cores"] for row in rec["setups"].values()
             for kind in ("cold", "warm") for r in row["runs"][kind]
             if r.get("other_cpu_cores") is not None]
    load = f" Other processes used {max(other):.2f} CPU cores at most." if other else ""
    caption = (
        f"Generated by `benchmarks/readme_table.py` from the `compile_cache` line of "
        f"{rec.get('_source', '?')} ({rec.get('date', '?')}): `benchmarks/compile_cache.py`, "
        f"the training command in a process of its own, {rec['steps']} steps from a new "
        f"`MODEL_DIR`, first with an empty cache directory (cold) and then again with what "
        f"that run stored (warm), {rec['repeats']} pair(s) per job, means. Init + state is "
        f"`timing/init_or_restore_seconds`, first step `timing/compilation_seconds`; the whole "
        f"command also holds the imports, the input pipeline's start and the steps.{load}")
    return _with_caption(out, caption, rec)


# How the ops table names step_ops.py's variants.
OPS_LABELS = {
    "einsum": "einsum (moetx today)", "heads_major": "heads-major layout",
    "query_chunks": "query-blocked, rematerialised", "query_chunks_scan": "query-blocked, lax.map",
    "key_blocks": "key-blocked, online softmax (flash order)",
    "per_example": "per example (lax.map)", "jax_sdpa": "jax.nn.dot_product_attention",
    "torch_matmul": "torch matmul + softmax (HF eager T5)",
    "torch_sdpa": "torch scaled_dot_product_attention",
    "full": "whole logits (moetx today)", "chunked": "token-chunked, rematerialised",
    "torch": "torch linear + logsumexp",
}


def make_ops_table(records: list[dict]) -> str | None:
    """The attention and loss-head tables of the latest `step_ops` line (one variant per row:
    ms per call at each shape, the per-step total and the speed-up over moetx's way today)
    and their caption; None without one."""
    lines = [rec for rec in latest(records) if rec.get("benchmark") == "step_ops"]
    if not lines:
        return None
    rec = lines[-1]
    shapes = rec["attention"]
    names = list(next(iter(shapes.values()))["variants"])
    head = " | ".join(f"{n.replace('_', ' ')} {v['query_length']}×{v['key_length']} (ms)"
                      for n, v in shapes.items())
    out = [f"| attention, forward + backward | {head} | per step (ms) | vs einsum |",
           "| --- |" + " --- |" * (len(shapes) + 2)]
    total = {n: sum(v["variants"][n]["per_step_ms"] for v in shapes.values()) for n in names}
    for n in names:
        cells = [f"{v['variants'][n]['median_ms']:.1f}" for v in shapes.values()]
        out.append(f"| {OPS_LABELS.get(n, n)} | " + " | ".join(cells)
                   + f" | {total[n]:,.0f} | {total[names[0]] / total[n]:.2f}× |")
    loss = rec["loss_head"]
    out += ["", f"| logits + loss, forward + backward ({loss['tokens']} tokens × "
                f"{loss['d_model']} → {loss['vocab']:,}) | ms per step | vs whole logits |",
            "| --- | --- | --- |"]
    for n, v in loss["variants"].items():
        out.append(f"| {OPS_LABELS.get(n, n)} | {v['median_ms']:.1f} | "
                   f"{v['speedup_vs_first']:.2f}× |")
    layers = next(iter(shapes.values()))["layers"]
    caption = (
        f"Generated by `benchmarks/readme_table.py` from the `step_ops` line of "
        f"{rec.get('_source', '?')} ({rec.get('date', '?')}): `benchmarks/step_ops.py`, each "
        f"op alone at the shapes of the enc-dec step (batch {rec['batch']}, {rec['heads']} "
        f"heads × {rec['head_dim']}), median of {rec['steps']} calls per variant, round-robin "
        f"within a shape. Per step: each attention shape × {layers} layers, summed. "
        f"Query blocks of {rec['chunk']}, token chunks of {rec['loss_chunk']}. Every variant's "
        f"output and gradients agree with the first of its table to 1e-4 (relative).")
    return _with_caption(out, caption, rec)


def rewrite(text: str, table: str, name: str = "README", start: str = START,
            end: str = END) -> str:
    """`text` with everything between the two markers replaced by `table`."""
    return markdown.replace_between(text, start, end, table, name)


# ----------------------------------------------------------------------------------- plot
def sweep_points(records: list[dict]) -> list[dict]:
    """The sweep's decoder-only lines that have a peer, by d_model."""
    pts = [rec for rec in latest(records)
           if is_sweep(rec) and rec.get("benchmark") == "train_throughput" and choose_peer(rec)]
    return sorted(pts, key=lambda rec: rec["model"]["d_model"])


def plot_scaling(records: list[dict], path: str) -> None:
    """Writes a PNG of tokens/s and MFU against d_model, moetx and the peer, from the sweep."""
    pts = sweep_points(records)
    if not pts:
        raise ValueError("no sweep rows in the results (run benchmarks/run_all.py --sweep)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = [rec["model"]["d_model"] for rec in pts]
    peers = [choose_peer(rec)[0] for rec in pts]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, field, title in ((ax_t, "tokens_per_sec", "training tokens/s"),
                             (ax_m, "mfu", "MFU (of the measured f32 matmul peak)")):
        ax.plot(d, [rec[f"moetx_{field}"] for rec in pts], "o-", label="moetx")
        ax.plot(d, [rec[f"{p}_{field}"] for rec, p in zip(pts, peers)], "s--",
                label="HF (faster of eager / torch.compile)")
        ax.set_xlabel("d_model")
        ax.set_xticks(d)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_t.set_yscale("log")
    ax_m.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax_t.legend()
    m = pts[0]["model"]
    fig.suptitle(f"Decoder-only T5.1.1, {m.get('layers')} layers, {pts[0].get('batch')} × "
                 f"{pts[0].get('length')} tokens, {pts[0].get('optimizer', {}).get('name', '')}"
                 f" ({pts[0].get('date', '')[:10]})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results files (JSON lines)")
    p.add_argument("--write", metavar="README", help="rewrite the table between the markers")
    p.add_argument("--plot", metavar="PNG", help="also write the scaling plot here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        records = load_results(args.results)
        # Each table of its own, beside the markers it goes between (None: no line for it).
        extras = [(make(records), start, end) for make, start, end in (
            (make_profile_table, PROFILE_START, PROFILE_END),
            (make_means_table, MEANS_START, MEANS_END),
            (make_ops_table, OPS_START, OPS_END),
            (make_vision_profile_tables, VISION_PROFILE_START, VISION_PROFILE_END),
            (make_moe_profile_table, MOE_PROFILE_START, MOE_PROFILE_END),
            (make_switch_profile_table, SWITCH_PROFILE_START, SWITCH_PROFILE_END),
            (make_input_pipeline_table, INPUT_START, INPUT_END),
            (make_compile_cache_table, CACHE_START, CACHE_END))]
        # A file holding only profile / means lines makes only their tables.
        only_extra = records and all(map(is_profile, records))
        table = None if only_extra else make_table(records)
        if args.write:
            with open(args.write) as f:
                text = f.read()
            new = text if table is None else rewrite(text, table, args.write)
            for extra, start, end in extras:
                if extra is not None:
                    new = rewrite(new, extra, args.write, start, end)
        if args.plot:
            plot_scaling(records, args.plot)
    except (OSError, ValueError) as e:
        raise SystemExit(f"readme_table.py: error: {e}") from None
    print("\n\n".join(t for t in (table, *(extra for extra, _, _ in extras))
                       if t is not None))
    if args.write and new != text:
        with open(args.write, "w") as f:
            f.write(new)
    if args.write:
        print(f"{args.write}: table {'rewritten' if new != text else 'unchanged'}",
              file=sys.stderr)
    if args.plot:
        print(f"{args.plot}: written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
