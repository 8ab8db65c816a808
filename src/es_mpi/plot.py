"""`es-mpi plot`: train reward, held-out score and KL of one or more runs, as a PNG.

Top row against iteration, bottom row against training wall time (the sum of the logged
iteration times: held-out evaluations and gaps between sessions are left out, so runs
interrupted and resumed compare fairly with uninterrupted ones).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .runlog import LOG_NAME, LogData, RunLog


def _minutes_at(data: LogData) -> np.ndarray:
    """Training minutes at the end of each iteration, with 0 prepended (before iteration 1)."""
    return np.concatenate([[0.0], np.cumsum(data.columns["time_iteration"]) / 60.0])


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: batch nodes have no display
    import matplotlib.pyplot as plt

    runs = [(d, RunLog(d / LOG_NAME).read()) for d in run_dirs]
    has_kl = any(np.isfinite(data.heldout["heldout_kl"]).any() for _, data in runs)
    columns = 3 if has_kl else 2
    fig, axes = plt.subplots(2, columns, figsize=(5.5 * columns, 8), squeeze=False)
    for index, (run_dir, data) in enumerate(runs):
        color = f"C{index}"
        label = run_dir.name if len({d.name for d in run_dirs}) == len(run_dirs) else str(run_dir)
        cols, held = data.columns, data.heldout
        iterations = np.arange(1, data.iterations_done + 1)
        minutes = _minutes_at(data)
        held_at = held["heldout_iteration"].astype(int)
        for row, x_train, x_held in (
            (0, iterations, held_at),
            (1, minutes[1:], minutes[np.clip(held_at, 0, data.iterations_done)]),
        ):
            ax = axes[row][0]
            ax.plot(x_train, cols["reward_mean"], color=color, label=label)
            ax.fill_between(
                x_train, cols["reward_min"], cols["reward_max"], color=color, alpha=0.15
            )
            ax = axes[row][1]
            ax.plot(x_held, held["heldout_accuracy"], "o-", color=color, label=f"{label} accuracy")
            ax.plot(
                x_held,
                held["heldout_reward"],
                "s--",
                color=color,
                alpha=0.6,
                label=f"{label} reward",
            )
            if has_kl:
                axes[row][2].plot(x_held, held["heldout_kl"], "o-", color=color, label=label)
    titles = ["train reward (mean, band min..max over members)", "held-out score", "KL to base"]
    for row, xlabel in ((0, "iteration"), (1, "training wall time (minutes)")):
        for col in range(columns):
            ax = axes[row][col]
            ax.set_title(titles[col], fontsize=10)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
