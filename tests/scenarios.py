"""Failure scenarios of a real multi-rank job, shared by tests/test_hpc.py (which asserts
the outcome) and benchmarks/failures.py (which reports the time from failure to exit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import MPIEXEC, ROOT, small_overrides

PLUGINS = Path(__file__).parent / "plugins"


@dataclass
class Outcome:
    returncode: int
    seconds_to_exit: float
    """From the failure (its time stamp, or the moment it was caused) to the job's exit."""
    stdout: str
    stderr: str


def train_command(run_dir: Path, model_dir: Path, ranks: int, **extra) -> list[str]:
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "es_mpi", "train"]
    cmd += ["--run-dir", str(run_dir)]
    for item in small_overrides(model_dir, **extra):
        cmd += ["--set", item]
    return cmd


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def rank_pids(mpiexec_pid: int) -> list[int]:
    """PIDs of the Python rank processes under an mpiexec (sorted: rank order not implied)."""
    pids = []
    for pid in _descendants(mpiexec_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(b"es_mpi" in a for a in argv) and b"python" in argv[0]:
            pids.append(pid)
    return sorted(pids)


def run_until(cmd: list[str], marker: str, action, env: dict | None = None) -> Outcome:
    """Start the job, wait for `marker` on stdout, call action(proc) -> failure time (or
    None: the failure stamps its own time in ES_MPI_FAIL_STAMP), then wait for the exit."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    lines = []
    failed_at = None
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            failed_at = action(proc)
            break
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    ended = time.time()
    return Outcome(
        proc.returncode, ended - failed_at if failed_at else float("nan"), "".join(lines) + out, err
    )


def stamped_failure(run_dir: Path, model_dir: Path, task: str, **extra) -> Outcome:
    """A plug-in task failing on rank 1 (exception or NaN); the time is its own stamp."""
    stamp = run_dir.parent / f"{run_dir.name}.stamp"
    env = {**os.environ, "PYTHONPATH": str(PLUGINS), "ES_MPI_FAIL_STAMP": str(stamp)}
    cmd = train_command(run_dir, model_dir, 2, **{"task.name": task, **extra})
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    ended = time.time()
    failed_at = float(stamp.read_text()) if stamp.exists() else start
    return Outcome(result.returncode, ended - failed_at, result.stdout, result.stderr)


def kill_one_rank(run_dir: Path, model_dir: Path) -> Outcome:
    """SIGKILL one rank (not the launcher) after iteration 2."""

    def act(proc) -> float:
        os.kill(rank_pids(proc.pid)[-1], signal.SIGKILL)
        return time.time()

    return run_until(train_command(run_dir, model_dir, 2, **{"es.iterations": 40}), "it 2/", act)


def signal_all(run_dir: Path, model_dir: Path, signum: int, iterations: int = 12) -> Outcome:
    """The scheduler's warning: `signum` to every process of the job after iteration 3."""

    def act(proc) -> float:
        os.killpg(proc.pid, signum)
        return time.time()

    cmd = train_command(run_dir, model_dir, 2, **{"es.iterations": iterations})
    return run_until(cmd, "it 3/", act)


def disk_trouble(run_dir: Path, model_dir: Path, mount: Path, kind: str) -> Outcome:
    """The run dir's file system fills up ('full') or turns read-only ('readonly') after
    iteration 2. `mount` must be a tmpfs this process may remount."""

    def act(proc) -> float:
        if kind == "full":  # the failure may strike while filling: time from the start
            started = time.time()
            # unbuffered: a buffered file would raise ENOSPC again when closed (flushing the
            # rest of its buffer), outside the try below
            with open(mount / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
            return started
        else:  # refused while a file is open for writing: retry until between writes
            for _ in range(500):
                remount = ["mount", "-o", "remount,ro", str(mount)]
                if subprocess.run(remount, capture_output=True).returncode == 0:
                    break
                time.sleep(0.01)
            else:
                raise RuntimeError(f"could not remount {mount} read-only")
        return time.time()

    cmd = train_command(run_dir, model_dir, 2, **{"es.iterations": 40, "checkpoint.every": 1})
    return run_until(cmd, "it 2/", act)
