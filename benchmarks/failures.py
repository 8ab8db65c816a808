"""Failure benchmark: seconds from a failure to the end of the whole 2-rank job.

Runs each failure kind of tests/scenarios.py once per repeat on a tiny random model and
prints min / median. Usage: python benchmarks/failures.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import subprocess  # noqa: E402

from es_mpi.tiny_model import build_tiny_llama  # noqa: E402
from scenarios import (  # noqa: E402
    disk_trouble,
    kill_one_rank,
    signal_all,
    stamped_failure,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = build_tiny_llama(tmp / "model", hidden=32, layers=2, heads=2)
        disk = tmp / "disk"
        disk.mkdir()
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
            ).returncode
            == 0
        )
        kinds = {
            "exception in rank 1's reward": lambda d: stamped_failure(
                d, model, "failing_task:FailOnRankOne"
            ),
            "NaN reward on rank 1 (policy fail)": lambda d: stamped_failure(
                d, model, "failing_task:NaNOnRankOne"
            ),
            "SIGKILL of one rank": lambda d: kill_one_rank(d, model),
            "SIGUSR1 to the job (clean stop, exit 75)": lambda d: signal_all(
                d, model, signal.SIGUSR1, iterations=40
            ),
        }
        if mounted:
            kinds["run dir on a full disk"] = lambda d: _disk(d, model, disk, "full")
            kinds["run dir turned read-only"] = lambda d: _disk(d, model, disk, "readonly")
        print(f"2 ranks, tiny random model; {args.repeats} repeats; seconds from failure to exit")
        for label, scenario in kinds.items():
            seconds, codes = [], set()
            for r in range(args.repeats):
                outcome = scenario(tmp / f"{abs(hash(label))}-{r}")
                seconds.append(outcome.seconds_to_exit)
                codes.add(outcome.returncode)
            print(
                f"  {label:<42} min {min(seconds):.2f} s, median {statistics.median(seconds):.2f} s"
                f" (exit codes {sorted(codes)})",
                flush=True,
            )
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _disk(run_dir: Path, model: Path, disk: Path, kind: str):
    subprocess.run(["mount", "-o", "remount,rw", str(disk)], capture_output=True)
    for old in disk.iterdir():
        subprocess.run(["rm", "-rf", str(old)])
    return disk_trouble(disk / run_dir.name, model, disk, kind)


if __name__ == "__main__":
    main()
