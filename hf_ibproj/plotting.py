"""The information-plane plot of a run (docs/method.md section 5, the paper's Figures 2, 3 and 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

INFORMATION_KEYS = ("I(Z1;R)", "I(Z1;Z2)", "H(Z1)", "lower_bound", "upper_bound")
ACCURACY_KEYS = ("online_probe_top1", "knn_top1")


def plot_information_plane(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Information quantities (nats) and accuracies against the training step, one PNG."""
    fig, (info_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for key in INFORMATION_KEYS:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            info_ax.plot(*zip(*points), label=key)
    info_ax.set(xlabel="step", ylabel="nats", title="information plane")
    for key in ACCURACY_KEYS:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            acc_ax.plot(*zip(*points), marker="o", label=key)
    acc_ax.set(xlabel="step", ylabel="top-1 accuracy (%)", title="monitors")
    for ax in (info_ax, acc_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
