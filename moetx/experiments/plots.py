"""An experiment's plots: each arm's mean eval loss over its seeds as a line, with a band from the
seeds' minimum to their maximum, against training FLOPs or wall-clock seconds. Needs matplotlib
(the `plots` extra); without it no plot is written and the caller is told so."""

from __future__ import annotations

from typing import Any, Mapping

AXES = {"flops": "training FLOPs (since the arm's start)",
        "seconds": "wall-clock seconds of training (mean over seeds)",
        "step": "training step"}


def plot_arms(curves: Mapping[str, Mapping[str, Any]], axis: str, path: str,
              title: str = "") -> bool:
    """Writes the plot of every arm's mean curve (curves.json's `mean`) against `axis` ('flops',
    'seconds' or 'step') to `path`; False when matplotlib is missing or nothing is plotted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    drawn = False
    for arm, c in curves.items():
        points = [p for p in c["mean"] if p.get(axis) is not None]
        if not points:
            continue
        xs = [p[axis] for p in points]
        (line,) = ax.plot(xs, [p["loss"] for p in points], marker=".",
                          label=f"{arm} ({points[-1]['n']} seeds)")
        ax.fill_between(xs, [p["min"] for p in points], [p["max"] for p in points],
                        color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        losses = [p["loss"] for c in curves.values() for p in c["mean"]]
        finals = [c["mean"][-1]["loss"] for c in curves.values() if c["mean"]]
        # Early evaluations sit far above the end of the runs: frame the last nat or so.
        top = min(max(losses), max(finals) + max(3 * (max(finals) - min(finals)), 1.0))
        ax.set_ylim(min(p["min"] for c in curves.values() for p in c["mean"]) - 0.02, top)
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel("eval loss (mean; band: min to max over seeds)")
        if title:
            ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return drawn
