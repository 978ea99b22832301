"""Plots of a search: each trial's reward and the best reward so far, against the trial number
(`best_reward.png` in SEARCH_DIR). Needs matplotlib (the `plots` extra); without it the plot is
skipped with a note."""

from __future__ import annotations

import sys
from typing import Sequence


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        print("[search] matplotlib is not installed (pip install 'moetx[plots]'): no plot.",
              file=sys.stderr)
        return None
    return plt


def plot_search(records: Sequence[dict], path: str, title: str | None = None) -> bool:
    """Writes the reward plot of `records` (trial-log entries) to `path`; False without
    matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    records = sorted(records, key=lambda r: r["id"])
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    styles = {"done": ("o", "tab:blue"), "hurdle": ("x", "tab:orange"),
              "duplicate": (".", "tab:gray")}
    for status, (marker, color) in styles.items():
        pts = [(r["id"], r["reward"]) for r in records
               if r["status"] == status and r["reward"] is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, s=14, label=status)
    best, curve = None, []
    for r in records:
        if r["status"] in ("done", "duplicate") and r["reward"] is not None:
            best = r["reward"] if best is None else max(best, r["reward"])
        curve.append((r["id"], best))
    curve = [(i, b) for i, b in curve if b is not None]
    if curve:
        ax.step(*zip(*curve), where="post", color="black", label="best so far")
    failed = sum(r["status"] in ("failed", "rejected") for r in records)
    if curve:
        # Zoom on the best-so-far curve; far-off rewards (diverged runs) fall below the frame.
        lo, hi = min(b for _, b in curve), max(b for _, b in curve)
        margin = max(hi - lo, 0.5)
        ax.set_ylim(lo - 2 * margin, hi + 0.2 * margin)
    ax.set_xlabel("trial")
    ax.set_ylabel("reward")
    ax.set_title(title or f"{len(records)} trials ({failed} failed or rejected)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of one run directory (e.g. `<model_dir>/eval`): tag -> [(step,
    value)] sorted by step."""
    import glob
    import os

    import tensorflow as tf

    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                value = (float(tf.make_ndarray(v.tensor)) if v.HasField("tensor")
                         else float(v.simple_value))
                out.setdefault(v.tag, {})[int(event.step)] = value
    return {tag: sorted(points.items()) for tag, points in out.items()}


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: str, xlabel: str,
                ylabel: str, title: str = "") -> bool:
    """One line per name: `curves[name]` is [(x, y)]; False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker=".", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
