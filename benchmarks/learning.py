"""Learning benchmark (`make bench-learning`): held-out accuracy of `make run`-style training
against wall time, for several run seeds, on this machine.

Each seed trains the embedded default with 2 ranks under a wall-time limit, scoring the
held-out split every `--eval-every` iterations; the log's held-out rows carry the wall clock.
Reported: base accuracy, the last held-out score at or before each checkpoint minute, and the
spread over seeds. Wall time depends on the machine (the same code ran 1.65 s per iteration
on one development machine and 2.4 s on another), so each seed also reports the median
seconds per iteration and the held-out score at fixed iteration counts (`--iteration-marks`).
Usage: python benchmarks/learning.py [--minutes 10] [--marks 5,10] [--seeds 0,1,2]
       [--iteration-marks 100,200,300] [--config configs/default.yaml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


def run(run_dir: Path, seed: int, args: argparse.Namespace) -> None:
    cmd = [
        MPIEXEC,
        "-n",
        str(args.ranks),
        sys.executable,
        "-m",
        "es_mpi",
        "train",
        "--config",
        str(args.config),
        "--run-dir",
        str(run_dir),
        "--overwrite",
        "--set",
        f"seed={seed}",
        "--set",
        "es.iterations=100000",
        "--set",
        f"runtime.time_limit_minutes={args.minutes}",
        "--set",
        f"task.eval_every={args.eval_every}",
        "--set",
        "checkpoint.every=0",
    ]
    for item in args.set:
        cmd += ["--set", item]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode not in (0, 75):  # 75: stopped at the time limit (resumable)
        sys.exit(f"training failed:\n{result.stderr[-3000:]}")


@dataclass
class SeedResult:
    base: float
    at_minute: list[float]  # last held-out accuracy at or before each minute mark
    at_iteration: list[float | None]  # held-out accuracy at each iteration mark (if reached)
    iterations: int
    seconds_per_iteration: float  # median


def read_run(run_dir: Path, marks: list[float], iteration_marks: list[int]) -> SeedResult:
    with h5py.File(run_dir / "run.h5", "r") as f:
        n = int(f.attrs["heldout_done"])
        acc = f["heldout_accuracy"][:n]
        its = f["heldout_iteration"][:n]
        done = int(f.attrs["iterations_done"])
        clock = f["wall_clock"][:done]
        seconds = f["time_iteration"][:done]
    start = clock[0] - seconds[0]
    # wall time at which each held-out evaluation's weights existed (end of its iteration)
    times = np.array([0.0 if i == 0 else clock[i - 1] - start for i in its])
    by_iteration = dict(zip(its.tolist(), acc.tolist(), strict=True))
    return SeedResult(
        base=float(acc[0]),
        at_minute=[float(acc[times <= 60 * m][-1]) for m in marks],
        at_iteration=[by_iteration.get(i) for i in iteration_marks],
        iterations=done,
        seconds_per_iteration=float(np.median(seconds)),
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--marks", default="5,10")
    p.add_argument("--iteration-marks", default="100,200,300")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-learning")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    marks = [float(m) for m in args.marks.split(",")]
    iteration_marks = [int(i) for i in args.iteration_marks.split(",")]
    print(
        f"config {args.config.name} {' '.join(args.set)}; {args.ranks} ranks, "
        f"{args.minutes} min per seed, held-out every {args.eval_every} iterations"
    )
    gains: dict[float, list[float]] = {m: [] for m in marks}
    for seed in (int(s) for s in args.seeds.split(",")):
        run_dir = args.out / f"seed{seed}"
        run(run_dir, seed, args)
        r = read_run(run_dir, marks, iteration_marks)
        cells = ", ".join(
            f"{m:g} min {100 * a:.1f}%" for m, a in zip(marks, r.at_minute, strict=True)
        )
        by_it = ", ".join(
            f"it {i} {'-' if a is None else f'{100 * a:.1f}%'}"
            for i, a in zip(iteration_marks, r.at_iteration, strict=True)
        )
        print(
            f"seed {seed}: base {100 * r.base:.1f}%, {cells} ({r.iterations} iterations, "
            f"median {r.seconds_per_iteration:.2f} s/it; {by_it}) [{run_dir}]",
            flush=True,
        )
        for m, a in zip(marks, r.at_minute, strict=True):
            gains[m].append(100 * (a - r.base))
    for m, g in gains.items():
        print(
            f"gain after {m:g} min: "
            + ", ".join(f"{x:+.1f}" for x in g)
            + f" points; mean {np.mean(g):+.1f}, spread {max(g) - min(g):.1f}"
        )


if __name__ == "__main__":
    main()
