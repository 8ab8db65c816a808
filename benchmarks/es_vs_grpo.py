"""ES against GRPO (`make bench-rl`): same config, base model, task, reward, held-out split
and greedy held-out evaluation, the same training time on the same 2 cores, several seeds.

ES: `es-mpi train` on `--ranks` ranks (1 thread each), held-out every `task.eval_every`
iterations. GRPO: `es-mpi grpo` (TRL, `grpo.threads` threads), held-out every
`--eval-seconds`. Time is training time (held-out evaluation not counted; ES's from the
logged iteration times). Samples are generated completions and tokens (ES: N x P per
iteration, its logged generation rate; GRPO: counted in the reward function).
Writes OUT/es_vs_grpo.json (every held-out point of every run) and OUT/es_vs_grpo.png (held-out
accuracy, or reward, against time and against completions, mean and min..max over seeds; with
a KL-reporting task also reward against KL, the paper's plot).
Usage: python benchmarks/es_vs_grpo.py [--config configs/default.yaml] [--minutes 10]
       [--seeds 0,1,2] [--marks 5,10] [--out DIR] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
ES_MPI = [sys.executable, "-m", "es_mpi"]
METHODS = ("es", "grpo")


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode not in (0, 75):  # ES: 75 is its stop at the time limit
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")


def run_es(args: argparse.Namespace, seed: int, out: Path) -> list[dict]:
    # ES's time limit counts held-out evaluations too: give it slack, cut the curve below
    run_dir = out / f"es-seed{seed}"
    cmd = [MPIEXEC, "-n", str(args.ranks), *ES_MPI, "train", "--config", str(args.config)]
    cmd += ["--run-dir", str(run_dir), "--overwrite", "--set", f"seed={seed}"]
    cmd += ["--set", "es.iterations=1000000", "--set", "checkpoint.every=0"]
    cmd += ["--set", f"runtime.time_limit_minutes={args.minutes * args.es_slack}"]
    for item in args.set:
        cmd += ["--set", item]
    _run(cmd)
    return es_points(run_dir / "run.h5", 60 * args.minutes)


def es_points(log: Path, budget: float) -> list[dict]:
    """Held-out points of an ES log with training seconds and samples at each."""
    with h5py.File(log, "r") as f:
        done = int(f.attrs["iterations_done"])
        seconds = np.concatenate([[0.0], np.cumsum(f["time_iteration"][:done])])
        generating = f["time_evaluate"][:done] + f["time_communicate"][:done]
        tokens = np.concatenate([[0.0], np.cumsum(f["tokens_per_second"][:done] * generating)])
        per_iteration = f["rewards"].shape[1] * _prompts_per_member(f)
        n = int(f.attrs["heldout_done"])
        rows = zip(
            f["heldout_iteration"][:n],
            f["heldout_accuracy"][:n],
            f["heldout_reward"][:n],
            f["heldout_kl"][:n],
            strict=True,
        )
        points = [
            {
                "seconds": float(seconds[k]),
                "iteration": int(k),
                "completions": int(k) * per_iteration,
                "tokens": float(tokens[k]),
                "accuracy": float(acc),
                "reward": float(reward),
                "kl": float(kl),
            }
            for k, acc, reward, kl in rows
        ]
    return [p for p in points if p["seconds"] <= budget]


def _prompts_per_member(f: h5py.File) -> int:
    import yaml

    return int(yaml.safe_load(f.attrs["config_yaml"])["task"]["prompts_per_member"])


def run_grpo(args: argparse.Namespace, seed: int, out: Path) -> list[dict]:
    run_dir = out / f"grpo-seed{seed}"
    cmd = [*ES_MPI, "grpo", "--config", str(args.config), "--out", str(run_dir)]
    cmd += ["--minutes", str(args.minutes), "--eval-seconds", str(args.eval_seconds)]
    cmd += ["--set", f"seed={seed}"]
    for item in args.set:
        cmd += ["--set", item]
    _run(cmd)
    return json.loads((run_dir / "grpo.json").read_text())["points"]


def value_at(points: list[dict], axis: str, mark: float, metric: str) -> float:
    """The latest held-out value at or before `mark` on `axis` (NaN past the run's end)."""
    if mark > points[-1][axis] and axis != "seconds":
        return float("nan")
    before = [p for p in points if p[axis] <= mark]
    return before[-1][metric] if before else float("nan")


def summary(runs: dict, marks: list[float], metric: str, completion_marks: list[int]) -> str:
    lines = [f"held-out {metric} (per seed; mean), before and after minutes of training:"]
    for method in METHODS:
        rows = []
        for seed, points in runs[method].items():
            values = [points[0][metric]] + [
                value_at(points, "seconds", 60 * m, metric) for m in marks
            ]
            rows.append(values)
            lines.append(f"  {method} seed {seed}: " + " | ".join(f"{v:.4f}" for v in values))
        mean = np.nanmean(np.array(rows), axis=0)
        header = " | ".join(["before"] + [f"{m:g} min" for m in marks])
        lines.append(f"  {method} mean ({header}): " + " | ".join(f"{v:.4f}" for v in mean))
    lines.append(f"held-out {metric} at equal numbers of generated completions (mean over seeds):")
    for method in METHODS:
        cells = []
        for c in completion_marks:
            v = [value_at(p, "completions", c, metric) for p in runs[method].values()]
            cells.append(
                f"{c / 1000:g}k: {np.nanmean(v):.4f}"
                if np.isfinite(v).any()
                else f"{c / 1000:g}k: -"
            )
        lines.append(f"  {method}: " + ", ".join(cells))
    for method in METHODS:
        ends = [(p[-1]["completions"], p[-1]["tokens"]) for p in runs[method].values()]
        lines.append(
            f"  {method}: {np.mean([e[0] for e in ends]):,.0f} completions, "
            f"{np.mean([e[1] for e in ends]):,.0f} tokens generated per run"
        )
    return "\n".join(lines)


def plot(runs: dict, metric: str, path: Path, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_kl = any(np.isfinite(p["kl"]) for pts in runs["es"].values() for p in pts[1:])
    fig, axes = plt.subplots(1, 3 if has_kl else 2, figsize=(15 if has_kl else 10, 4.2))
    for method, colour in zip(METHODS, ("tab:blue", "tab:orange"), strict=True):
        for ax, axis, scale in ((axes[0], "seconds", 60.0), (axes[1], "completions", 1000.0)):
            end = max(p[-1][axis] for p in runs[method].values())
            grid = np.linspace(0, 60 * minutes if axis == "seconds" else end, 200)
            curves = np.array(
                [[value_at(p, axis, x, metric) for x in grid] for p in runs[method].values()]
            )
            ax.plot(grid / scale, np.nanmean(curves, axis=0), color=colour, label=method.upper())
            ax.fill_between(
                grid / scale,
                np.nanmin(curves, axis=0),
                np.nanmax(curves, axis=0),
                color=colour,
                alpha=0.2,
            )
        if has_kl:
            points = [p for pts in runs[method].values() for p in pts if np.isfinite(p["kl"])]
            axes[2].scatter(
                [p["kl"] for p in points],
                [p["reward"] for p in points],
                color=colour,
                label=method.upper(),
                s=14,
            )
    axes[0].set_xlabel("training minutes (held-out evaluation not counted)")
    axes[1].set_xlabel("generated completions (thousands)")
    axes[1].set_xscale("symlog", linthresh=1.0)
    for ax in axes[:2]:
        ax.set_ylabel(f"held-out {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    if has_kl:
        axes[2].set_xlabel("KL(model || base) per token, held-out")
        axes[2].set_ylabel("held-out reward")
        axes[2].grid(alpha=0.3)
        axes[2].legend()
    fig.suptitle(f"ES vs GRPO: mean and min..max over {len(runs['es'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--marks", default="", help="minutes, comma-separated (default: M/2, M)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ranks", type=int, default=2, help="ES ranks (1 thread each)")
    p.add_argument("--eval-seconds", type=float, default=60.0, help="GRPO held-out period")
    p.add_argument("--es-slack", type=float, default=1.15, help="ES wall limit / training time")
    p.add_argument("--metric", default="", help="accuracy or reward (default: by task)")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "es-vs-grpo")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    marks = (
        [float(m) for m in args.marks.split(",")]
        if args.marks
        else [args.minutes / 2, args.minutes]
    )
    runs = {method: {} for method in METHODS}
    for seed in (int(s) for s in args.seeds.split(",")):
        runs["es"][seed] = run_es(args, seed, args.out)
        runs["grpo"][seed] = run_grpo(args, seed, args.out)
        counts = {m: len(runs[m][seed]) for m in METHODS}
        print(f"seed {seed}: held-out points {counts}", flush=True)
    # a task that reports KL (conciseness) has no accuracy to speak of: compare rewards
    first = next(iter(runs["es"].values()))
    metric = args.metric or ("reward" if any(np.isfinite(p["kl"]) for p in first) else "accuracy")
    completion_marks = [1000, 10_000, 50_000, 100_000, 500_000, 1_000_000]
    text = summary(runs, marks, metric, completion_marks)
    print(text)
    record = {
        "config": str(args.config),
        "minutes": args.minutes,
        "set": args.set,
        "metric": metric,
        "runs": runs,
    }
    (args.out / "es_vs_grpo.json").write_text(json.dumps(record, indent=1))
    (args.out / "es_vs_grpo.txt").write_text(text + "\n")
    plot(runs, metric, args.out / "es_vs_grpo.png", args.minutes)
    print(f"wrote {args.out / 'es_vs_grpo.json'}, es_vs_grpo.png")


if __name__ == "__main__":
    main()
