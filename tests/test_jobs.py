"""Batch job scripts: directives as the schedulers parse them, the commands they render
(ES_MPI_DRY_RUN=1), and jobs/pbs.sh driven end to end with stand-in qsub/qstat and the
signals PBS sends at the walltime. The Slurm scripts run on a real Slurm in test_slurm.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from conftest import ROOT, run_cli, small_overrides, write_config

JOBS = ROOT / "jobs"
PLUGINS = Path(__file__).parent / "plugins"
SCRIPTS = ["slurm.sh", "pbs.sh", "sweep.sh"]


def render(script: str, *args: str, **env: str) -> str:
    result = subprocess.run(
        ["bash", str(JOBS / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "ES_MPI_DRY_RUN": "1", **env},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("script", [*SCRIPTS, "lib.sh"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(JOBS / script)]).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_directives_are_what_the_schedulers_accept(script):
    """PBS takes everything after a directive's option as its argument (a trailing
    `# comment` is a qsub directive error); sbatch strips comments, but one option per line
    keeps the scripts uniform. Directives end at the first command (both schedulers)."""
    lines = (JOBS / script).read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    directives = [line for line in lines if re.match(r"\s*#(SBATCH|PBS)\b", line)]
    assert directives, "no directives"
    for line in directives:
        assert lines.index(line) < first_command, f"directive after the first command: {line}"
        words = line.split()
        assert words[0] in ("#SBATCH", "#PBS"), f"directive not at column 0: {line}"
        assert "#" not in " ".join(words[1:]), f"text after the directive: {line}"
        if words[0] == "#SBATCH":
            assert len(words) == 2 and words[1].startswith("--"), line
        else:
            assert len(words) == 3 and re.fullmatch(r"-[A-Za-z]", words[1]), line
    pbs = [line for line in directives if line.startswith("#PBS -l")]
    if script == "pbs.sh":
        assert "#PBS -l place=scatter" in pbs


def test_slurm_renders_srun_with_pmi_and_resumes_an_existing_run(tmp_path):
    run_dir = tmp_path / "run"
    assert render("slurm.sh", "cfg.yaml", str(run_dir)) == (
        "srun --mpi=pmi2 --kill-on-bad-exit=1 es-mpi train "
        f"--config cfg.yaml --run-dir {run_dir} --device auto"
    )
    run_dir.mkdir()
    (run_dir / "run.h5").write_bytes(b"")
    gpus = render(
        "slurm.sh",
        "cfg.yaml",
        str(run_dir),
        SLURM_CPUS_PER_TASK="8",
        SLURM_GPUS_PER_TASK="h100:1",
        ES_MPI_SRUN_MPI="pmix",
    )
    assert gpus == (
        "srun --mpi=pmix --kill-on-bad-exit=1 --cpus-per-task=8 es-mpi resume "
        f"--run-dir {run_dir} --device cuda"
    )
    assert render("slurm.sh", "c", str(run_dir), SLURM_GPUS_ON_NODE="4").endswith("--device cuda")
    assert render("slurm.sh", "c", str(run_dir), DEVICE="cpu").endswith("--device cpu")


def test_pbs_takes_ranks_and_nodes_from_the_nodefile(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\n" * 8 + "n2\n" * 8)  # select=2:mpiprocs=8
    out = render("pbs.sh", "cfg.yaml", str(tmp_path / "r"), PBS_NODEFILE=str(nodefile))
    assert out == (
        f"mpiexec -n 16 --ppn 8 es-mpi train --config cfg.yaml --run-dir {tmp_path / 'r'} "
        "--device auto"
    )


def test_pbs_job_with_gpus_runs_on_cuda(tmp_path):
    qstat = tmp_path / "qstat"
    qstat.write_text(QSTAT.replace("ngpus = 0", "ngpus = 4"))
    qstat.chmod(0o755)
    env = {"PBS_JOBID": "1.x", "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    assert render("pbs.sh", "cfg.yaml", str(tmp_path / "r"), **env).endswith("--device cuda")


def test_sweep_task_takes_its_line_and_checks_the_array(tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# comment\n\na es.population=8\nb es.sigma=0.2 es.rank=4\n")
    out = render("sweep.sh", str(sweep), str(tmp_path / "s"), SLURM_ARRAY_TASK_ID="1")
    assert out == (
        "srun --mpi=pmi2 --kill-on-bad-exit=1 es-mpi train --config configs/default.yaml "
        f"--run-dir {tmp_path / 's' / 'b'} --device auto --set es.sigma=0.2 --set es.rank=4"
    )

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(JOBS / "sweep.sh"), *args],
            env={**os.environ, "ES_MPI_DRY_RUN": "1", **env},
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    missing = run(str(sweep), str(tmp_path / "s"), SLURM_ARRAY_TASK_ID="5")
    assert missing.returncode == 2 and "no line 5" in missing.stderr
    wrong = run(str(sweep), str(tmp_path / "s"), SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_MAX="3")
    assert wrong.returncode == 2 and "--array ends at 3 but" in wrong.stderr
    no_dir = run(str(sweep))
    assert no_dir.returncode == 2 and "explicit sweep dir" in no_dir.stderr


def test_missing_environment_is_named(tmp_path):
    setup = tmp_path / "setup.sh"
    setup.write_text("export PATH=/nonexistent\n")
    result = subprocess.run(
        ["/bin/bash", str(JOBS / "slurm.sh"), "cfg.yaml", str(tmp_path / "r")],
        env={"ES_MPI_SETUP": str(setup), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "es-mpi is not on PATH" in result.stderr


# --- jobs/pbs.sh at the walltime ------------------------------------------------------------

QSTAT = """#!/bin/bash
echo "Job Id: $2"
echo "    Resource_List.ngpus = 0"
echo "    Resource_List.walltime = 01:00:00"
echo "    resources_used.walltime = 00:00:05"
"""
QSUB = """#!/bin/bash
printf '%s\\n' "$@" > "$QSUB_CALLS"
echo 2.stand-in
"""


def _stand_in_pbs(tmp_path: Path, run_dir: Path, config: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("qstat", QSTAT), ("qsub", QSUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text(f"{os.uname().nodename}\n" * 2)  # select=1:mpiprocs=2
    setup = tmp_path / "setup.sh"  # what a user's ES_MPI_SETUP does: put es-mpi on PATH
    setup.write_text(f"export PATH={Path(sys.executable).parent}:$PATH\n")
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",  # PBS passes none of the submitter's environment
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(PLUGINS),
        "PBS_JOBID": "1.stand-in",
        "PBS_O_WORKDIR": str(ROOT),
        "PBS_NODEFILE": str(nodefile),
        "ES_MPI_SETUP": str(setup),
        "CONFIG": str(config),
        "RUN_DIR": str(run_dir),
        "QSUB_CALLS": str(tmp_path / "qsub-calls"),
    }


def _final_checksum(run_dir: Path) -> tuple[int, str]:
    with h5py.File(run_dir / "run.h5", "r") as f:
        done = int(f.attrs["iterations_done"])
        return done, f["checksum"][done - 1].decode()


@pytest.mark.slow
def test_pbs_walltime_term_then_kill_checkpoints_resubmits_and_resumes(tiny_model_dir, tmp_path):
    """PBS at the walltime: SIGTERM to every process of the job, SIGKILL 10 s later. The
    batch shell survives the TERM, the ranks stop after their iteration with a checkpoint
    (exit 75), the shell submits its continuation, which finishes on the weights of an
    uninterrupted run."""
    overrides = small_overrides(
        tiny_model_dir, **{"es.iterations": 40, "task.name": "slow_task:SlowArithmetic"}
    )
    config = write_config(tmp_path / "config.yaml", overrides)
    reference = tmp_path / "reference"
    env = {**os.environ, "PYTHONPATH": str(PLUGINS)}
    train = ["train", "--config", str(config), "--run-dir", str(reference)]
    assert run_cli(train, ranks=2, env=env).returncode == 0

    run_dir = tmp_path / "run"
    job_env = _stand_in_pbs(tmp_path, run_dir, config)
    output = tmp_path / "job.out"
    with output.open("w") as out:
        job = subprocess.Popen(
            ["bash", str(JOBS / "pbs.sh")],
            cwd=tmp_path,
            env=job_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as PBS's job session
        )
        _wait_for(output, "it 8/40")
        os.killpg(job.pid, signal.SIGTERM)
        try:
            rc = job.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            pytest.fail(f"still running 10 s after SIGTERM:\n{output.read_text()}")
    text = output.read_text()
    assert rc == 75, text
    assert "SIGTERM: stopped after iteration" in text or "SIGUSR1: stopped after" in text
    calls = Path(job_env["QSUB_CALLS"]).read_text().split("\n")
    assert calls[0] == "-v" and calls[2] == "jobs/pbs.sh", calls
    passed = dict(item.split("=", 1) for item in calls[1].split(","))
    assert passed["RUN_DIR"] == str(run_dir) and passed["ES_MPI_RESTARTS"] == "1"

    # The continuation as qsub would start it: only the variables passed with -v.
    continued = subprocess.run(
        ["bash", str(JOBS / "pbs.sh")],
        cwd=tmp_path,
        env={**job_env, **passed, "PBS_JOBID": "2.stand-in"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert continued.returncode == 0, continued.stdout + continued.stderr
    assert "resuming at iteration" in continued.stdout
    assert _final_checksum(run_dir) == _final_checksum(reference)


def _wait_for(path: Path, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        time.sleep(0.2)
    pytest.fail(f"{text!r} not in {path} after {timeout} s:\n{path.read_text()}")
