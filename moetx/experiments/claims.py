"""The papers' claims, one row each, from the experiments' summaries: the paper's figure, moetx's
measured figure with its spread over seeds, and a verdict given by a fixed rule, so the README's
table is generated from the runs and never typed.

    python -m moetx.experiments.claims --runs runs/experiments --runs docs/claims \\
        --write README.md --archive docs/claims

reads `<runs>/<experiment>/summary.json` for each experiment the claims name, from the first
`--runs` directory that has it (an experiment run nowhere gives a row saying so), prints the
table, and with `--write` replaces the text between `<!-- claims-table:start -->` and
`<!-- claims-table:end -->` in that file. `--archive DIR` copies what the table and the README
use of each experiment found (`summary.json`, `summary.md`, `curves.json`, `loss_vs_flops.png`)
to `DIR/<experiment>/`: the runs themselves (checkpoints, logs) stay out of the repository, and
the archive alone regenerates the table (`--runs DIR`), so an experiment rerun at a larger
budget replaces its own rows and leaves the others as they were.

The verdicts (the same words for every claim):
- a speed-up claim (an arm reaches the baseline's final eval loss with less training compute):
  *reproduced* when every seed's FLOPs speed-up is above 1 and their mean reaches the paper's
  lower figure; *smaller* when every seed's is above 1 but the mean falls short of the paper's;
  *not seen at this scale* otherwise (a seed at or below 1, or one that never reaches the loss).
- a quality claim (arm A ends at a lower eval loss than arm B): *reproduced* when A's mean is
  lower by more than the two spreads together (the seed ranges do not overlap); *the opposite
  at this scale* when it is higher by more than the spreads; *not seen at this scale* otherwise
  (a difference within the seeds' spread is no evidence either way; the measured text says
  which way it went).
- a stability claim (the method removes divergences): *reproduced* when some run without it
  diverges and none with it does; *smaller* when no run diverges either way but the runs with it
  have fewer loss spikes; *not seen at this scale* otherwise (nothing to remove, or no better).
- the capacity claim (train at 1.25, evaluate at 2.0): *reproduced* when 1.25's eval loss is
  within the spreads of 2.0's (dropping its tokens costs no measurable quality) and below
  1.0's by more than the spreads (the capacity matters); *not seen at this scale* otherwise.

Spread is half the range over seeds, as everywhere in `moetx.experiments`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Callable, Mapping, Sequence

from moetx.util import markdown

START = "<!-- claims-table:start -->"
END = "<!-- claims-table:end -->"

REPRODUCED, SMALLER, NOT_SEEN, OPPOSITE, NOT_RUN = (
    "reproduced", "smaller", "not seen at this scale", "the opposite at this scale",
    "not run yet")

Summary = Mapping[str, Any]

# A run that lost more CPU than this (cores, its record's `host_cpu_cores['other']`) to the
# machine's other processes or the hypervisor is flagged: its seconds are the machine's, not
# the model's. (The runner flags it too.)
LOADED_CORES = 0.25


@dataclasses.dataclass(frozen=True)
class Claim:
    """One row: `judge(summary) -> (measured text, verdict)` over the experiment's summary."""

    experiment: str
    claim: str
    paper: str
    judge: Callable[[Summary], tuple[str, str]]


# ------------------------------------------------------------------------------ formatting
def _pm(stats: Mapping[str, Any] | None, fmt: str = ".3f") -> str:
    return "–" if stats is None else f"{stats['mean']:{fmt}} ± {stats['spread']:{fmt}}"


def _speedup_text(axis_stats: Mapping[str, Any]) -> str:
    values = [v for v in axis_stats["per_seed"].values() if v is not None]
    if axis_stats["mean"] is None:
        return f"not reached ({axis_stats['reached']} seeds reach it)"
    return f"{axis_stats['mean']:.2f}× ({min(values):.2f}–{max(values):.2f})"


def _cpu_lost_text(summary: Summary, arms: Sequence[str]) -> str:
    """' (the runs lost up to X cores to other work)' when some run of `arms` lost more than
    LOADED_CORES of CPU to the machine's other processes or its hypervisor, which slows its
    wall time but not its steps; '' otherwise, or when the runs did not record it."""
    lost = []
    for name in arms:
        other = (_arm(summary, name).get("host_cpu_cores") or {}).get("other")
        lost += other["values"] if other else []
    if not lost or max(lost) <= LOADED_CORES:
        return ""
    return f" (a run lost {max(lost):.1f} CPU cores to other work)"


def _arm(summary: Summary, name: str) -> Mapping[str, Any]:
    try:
        return summary["arms"][name]
    except KeyError:
        raise ValueError(f"experiment {summary.get('name')!r} has no arm {name!r}; its arms: "
                         f"{sorted(summary.get('arms', {}))}") from None


def _loss(summary: Summary, name: str) -> Mapping[str, Any]:
    stats = _arm(summary, name)["final_eval_loss"]
    if stats is None:
        raise ValueError(f"arm {name!r} of {summary.get('name')!r} has no final eval loss")
    return stats


# --------------------------------------------------------------------------------- rules
def speedup_verdict(axis_stats: Mapping[str, Any], paper_min: float) -> str:
    """The speed-up rule (module docstring) on one axis's `{'per_seed', 'mean'}`."""
    values = list(axis_stats["per_seed"].values())
    if not values or any(v is None or v <= 1.0 for v in values):
        return NOT_SEEN
    return REPRODUCED if axis_stats["mean"] >= paper_min else SMALLER


def lower_loss_verdict(better: Mapping[str, Any], worse: Mapping[str, Any]) -> str:
    """The quality rule: does `better` (mean/spread stats) end below `worse`?"""
    gap, noise = worse["mean"] - better["mean"], better["spread"] + worse["spread"]
    return REPRODUCED if gap > noise else OPPOSITE if -gap > noise else NOT_SEEN


def _instability(summary: Summary, arms: Sequence[str]) -> tuple[int, int, int]:
    """(diverged runs, loss spikes, runs) over `arms`."""
    diverged = spikes = runs = 0
    for name in arms:
        a = _arm(summary, name)
        diverged += len(a["failures"])
        spikes += sum(a["loss_spikes"].values())
        runs += len(a["loss_spikes"])
    return diverged, spikes, runs


def stability_verdict(without: tuple[int, int, int], with_: tuple[int, int, int]) -> str:
    """The stability rule on (diverged, spikes, runs) of the arms without and with the method."""
    if without[0] > 0 and with_[0] == 0:
        return REPRODUCED
    if without[0] == 0 and with_[0] == 0 and with_[1] < without[1]:
        return SMALLER
    return NOT_SEEN


def capacity_verdict(cf10, cf125, cf20) -> str:
    """The capacity rule on the three arms' final eval-loss stats."""
    if cf125["mean"] - cf20["mean"] > cf125["spread"] + cf20["spread"]:
        return NOT_SEEN
    return REPRODUCED if lower_loss_verdict(cf125, cf10) == REPRODUCED else NOT_SEEN


# -------------------------------------------------------------------------------- judges
def speedup_claim(arm: str, paper_min: float) -> Callable[[Summary], tuple[str, str]]:
    """An arm's speed-up to the baseline's final loss, in FLOPs (the verdict's axis) and wall
    time, with both final losses."""

    def judge(summary: Summary) -> tuple[str, str]:
        a, base = _arm(summary, arm), summary["baseline"]
        text = (f"{_speedup_text(a['speedup']['flops'])} in FLOPs, "
                f"{_speedup_text(a['speedup']['seconds'])} in wall time"
                f"{_cpu_lost_text(summary, (arm, base))}; eval loss "
                f"{_pm(_loss(summary, arm))} vs {_pm(_loss(summary, base))}")
        return text, speedup_verdict(a["speedup"]["flops"], paper_min)

    return judge


def lower_loss_claim(better: str, worse: str) -> Callable[[Summary], tuple[str, str]]:
    """`better` ends at a lower eval loss than `worse`."""

    def judge(summary: Summary) -> tuple[str, str]:
        b, w = _loss(summary, better), _loss(summary, worse)
        gap = w["mean"] - b["mean"]
        within = " (within the seeds' spread)" if abs(gap) <= b["spread"] + w["spread"] else ""
        text = (f"eval loss {_pm(b)} vs {_pm(w)}: {'lower' if gap > 0 else 'higher'} by "
                f"{abs(gap):.3f}{within}")
        return text, lower_loss_verdict(b, w)

    return judge


def stability_claim(without: Sequence[str], with_: Sequence[str],
                    labels: tuple[str, str] = ("without", "with")
                    ) -> Callable[[Summary], tuple[str, str]]:
    """The arms `with_` the method diverge and spike less than the arms `without` it; `labels`
    name the two groups in the measured text."""

    def judge(summary: Summary) -> tuple[str, str]:
        wo, wi = _instability(summary, without), _instability(summary, with_)
        text = (f"{labels[0]}: {wo[0]}/{wo[2]} runs diverged, {wo[1]} loss spikes; "
                f"{labels[1]}: {wi[0]}/{wi[2]} diverged, {wi[1]} spikes")
        return text, stability_verdict(wo, wi)

    return judge


def capacity_claim(cf10: str, cf125: str, cf20: str) -> Callable[[Summary], tuple[str, str]]:
    def judge(summary: Summary) -> tuple[str, str]:
        cells = []
        for label, name in (("1.0", cf10), ("1.25", cf125), ("2.0", cf20)):
            a = _arm(summary, name)
            cells.append(f"{label}: loss {_pm(_loss(summary, name))}, dropped "
                         f"{_pm(a['train_fraction_dropped'])} in training, "
                         f"{_pm(a['eval_fraction_dropped'])} at eval")
        return "; ".join(cells), capacity_verdict(
            _loss(summary, cf10), _loss(summary, cf125), _loss(summary, cf20))

    return judge


CLAIMS: tuple[Claim, ...] = (
    Claim("primer", "Primer-EZ reaches the vanilla Transformer's quality with less compute",
          "3–4× less compute on C4 (So et al. 2021)", speedup_claim("primer_ez", 3.0)),
    Claim("primer", "Primer reaches the vanilla Transformer's quality with less compute",
          "3–4× less compute on C4 (So et al. 2021)", speedup_claim("primer", 3.0)),
    Claim("moe_vs_dense", "Switch (top-1, 8 experts) beats dense at equal FLOPs per token",
          "several times faster to equal quality, up to 7× with 128 experts (Fedus et al.)",
          speedup_claim("switch_top1_e8", 2.0)),
    Claim("moe_vs_dense", "Switch (top-1, 16 experts) beats dense at equal FLOPs per token",
          "several times faster, more experts faster still (Fedus et al.)",
          speedup_claim("switch_top1_e16", 2.0)),
    Claim("moe_vs_dense", "ST-MoE (top-2, 8 experts) beats dense at equal active FLOPs",
          "several times faster (ST-MoE, Switch)", speedup_claim("st_moe_top2_e8", 2.0)),
    Claim("moe_vs_dense", "ST-MoE (top-2, 16 experts) beats dense at equal active FLOPs",
          "several times faster (ST-MoE, Switch)", speedup_claim("st_moe_top2_e16", 2.0)),
    Claim("moe_vs_dense", "top-2 routing beats top-1 (8 experts)",
          "top-2 better than top-1 (ST-MoE routing ablation)",
          lower_loss_claim("st_moe_top2_e8", "switch_top1_e8")),
    Claim("router_zloss", "router z-loss removes divergences (bfloat16 activations)",
          "z-loss makes training stable where it diverged without (ST-MoE)",
          stability_claim(("no_zloss_f32_router", "no_zloss_bf16_router"),
                          ("zloss_f32_router", "zloss_bf16_router"))),
    Claim("router_zloss", "router z-loss slightly improves quality (float32 router)",
          "slightly better quality with z-loss (ST-MoE)",
          lower_loss_claim("zloss_f32_router", "no_zloss_f32_router")),
    Claim("router_zloss", "a float32 router is more stable than a bfloat16 one (no z-loss)",
          "bfloat16 router logits diverge; float32 router is needed (Switch, selective "
          "precision)", stability_claim(("no_zloss_bf16_router",), ("no_zloss_f32_router",),
                                        ("bfloat16 router", "float32 router"))),
    Claim("capacity", "train capacity factor 1.25 with 2.0 at eval is enough",
          "train CF 1.25, eval CF 2.0 recommended (ST-MoE)",
          capacity_claim("train_cf1.0", "train_cf1.25", "train_cf2.0")),
    Claim("upcycling", "sparse upcycling beats continuing the dense run for the same extra "
          "compute", "upcycled MoE ahead of continued dense training (Komatsuzaki et al. 2022)",
          lower_loss_claim("upcycled_top2_e8", "dense_continued")),
)


# --------------------------------------------------------------------------------- table
HEADER = ("| claim | paper | moetx (mean ± spread over seeds) | verdict | regenerate |\n"
          "|---|---|---|---|---|")


def find_runs(runs_dirs: Sequence[str], experiments: Sequence[str]) -> dict[str, str]:
    """`{experiment: directory}`: for each experiment, the first of `runs_dirs` holding
    `<experiment>/summary.json` (experiments found in none are left out)."""
    out = {}
    for name in experiments:
        for root in runs_dirs:
            if os.path.exists(os.path.join(root, name, "summary.json")):
                out[name] = os.path.join(root, name)
                break
    return out


def load_summaries(runs_dirs: Sequence[str], experiments: Sequence[str]) -> dict[str, Summary]:
    """`{experiment: summary}` from the first of `runs_dirs` holding each experiment's
    `summary.json`."""
    out = {}
    for name, directory in find_runs(runs_dirs, experiments).items():
        with open(os.path.join(directory, "summary.json")) as f:
            out[name] = json.load(f)
    return out


def budget_flag(summary: Summary) -> str:
    """` --gin.BUDGET=<b>`, `b` the budget most arms ran at (ties: the baseline's), so the
    command reruns what was measured whatever the gin file's default. An arm with a budget of
    its own (upcycling's base run, at the gin file's BASE_BUDGET) is not the experiment's
    BUDGET and keeps its gin setting."""
    arms = summary["arms"]
    counts = collections.Counter(a["budget"] for a in arms.values())
    baseline = arms.get(summary.get("baseline"), {}).get("budget")
    budget = max(counts, key=lambda b: (counts[b], b == baseline))
    return f" --gin.BUDGET={budget:g}".replace("e+", "e")


def make_table(summaries: Mapping[str, Summary], claims: Sequence[Claim] = CLAIMS) -> str:
    """The Markdown table, one row per claim (a claim whose experiment has no summary says it
    has not run), and a caption with each experiment's seeds and budget."""
    rows = [HEADER]
    for c in claims:
        command = f"python -m moetx.experiments.run --gin_file=experiments/{c.experiment}.gin"
        if c.experiment in summaries:
            command += budget_flag(summaries[c.experiment])
            measured, verdict = c.judge(summaries[c.experiment])
        else:
            measured, verdict = "–", NOT_RUN
        command = f"`{command}`"
        rows.append(f"| {c.claim} | {c.paper} | {measured} | **{verdict}** | {command} |")
    notes = []
    for name in dict.fromkeys(c.experiment for c in claims):
        s = summaries.get(name)
        if s is None:
            continue
        budgets = sorted({a["budget"] for a in s["arms"].values()})
        steps = sorted({a["steps"] for a in s["arms"].values()})
        notes.append(f"{name}: {len(s['seeds'])} seeds, {'/'.join(f'{b:.3g}' for b in budgets)}"
                     f" training FLOPs per run ({min(steps)}–{max(steps)} steps), baseline "
                     f"{s['baseline']}")
    caption = ("Verdicts by the rules in `moetx/experiments/claims.py`; speed-ups are the "
               "baseline's compute to its final eval loss over the arm's, per seed (mean, "
               "min–max). " + "; ".join(notes) + ".")
    return "\n".join(rows) + "\n\n" + caption


#: What `--archive` keeps of an experiment's output directory.
ARCHIVED = ("summary.json", "summary.md", "curves.json", "loss_vs_flops.png")


def archive(found: Mapping[str, str], dest: str) -> list[str]:
    """Copies the `ARCHIVED` files of each experiment in `found` (`{name: its directory}`, as
    `find_runs` gives) to `dest/<name>/`; a directory already inside `dest` is left as it is.
    Returns the paths written."""
    written = []
    for name, src_dir in found.items():
        dst_dir = os.path.join(dest, name)
        if os.path.abspath(src_dir) == os.path.abspath(dst_dir):
            continue
        os.makedirs(dst_dir, exist_ok=True)
        for file in ARCHIVED:
            src = os.path.join(src_dir, file)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(dst_dir, file))
                written.append(os.path.join(dst_dir, file))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moetx.experiments.claims",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", action="append", metavar="DIR",
                   help="a directory holding experiments' OUTPUT_DIRs (or an archive); may be "
                        "given several times, the first holding an experiment is used "
                        "(default: runs/experiments)")
    p.add_argument("--write", metavar="README", help="replace the table between the markers")
    p.add_argument("--archive", metavar="DIR",
                   help="copy each experiment's summary, curves and loss-vs-FLOPs plot to "
                        "DIR/<experiment>/")
    args = p.parse_args(argv)
    experiments = list(dict.fromkeys(c.experiment for c in CLAIMS))
    runs = args.runs or ["runs/experiments"]
    summaries = load_summaries(runs, experiments)
    table = make_table(summaries)
    print(table)
    if args.write:
        with open(args.write) as f:
            text = f.read()
        try:
            text = markdown.replace_between(text, START, END, table, args.write)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        with open(args.write, "w") as f:
            f.write(text)
    if args.archive:
        for path in archive(find_runs(runs, experiments), args.archive):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
