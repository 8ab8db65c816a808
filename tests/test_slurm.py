"""The job scripts on a real Slurm (a single-node cluster started by tests/slurm/run-tests.sh,
`make test-slurm`): the world really has the ranks Slurm started, a preemption and a time
limit each requeue the job into the same run dir and end on the uninterrupted run's weights,
a sweep member that is stopped resumes, and a site MPI library is used through Slurm's PMI.

Skipped unless SLURM_CONF names that cluster's config.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from conftest import ROOT, small_overrides, write_config

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        not os.environ.get("ES_MPI_TEST_SLURM"), reason="needs the test cluster: make test-slurm"
    ),
]
PLUGINS = Path(__file__).parent / "plugins"
JOB_TIMEOUT = 180.0  # seconds for a job, requeues included
# sbatch options that fit the one 2-CPU test node; the scripts' own are for real clusters.
SMALL = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-task=0"]


def job_env(**extra: str) -> dict[str, str]:
    # the task plug-in (slow_task) and this Python's es-mpi on the compute node
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**os.environ, "PYTHONPATH": str(PLUGINS), "PATH": path, **extra}


def job_config(path: Path, model_dir: Path, **extra) -> Path:
    """About 10 s of training on 2 ranks: 60 iterations of a task that sleeps per answer."""
    settings = {"es.iterations": 60, "task.name": "slow_task:SlowArithmetic", **extra}
    return write_config(path, small_overrides(model_dir, **{"checkpoint.every": 10, **settings}))


def sbatch(*args: str, env: dict | None = None) -> str:
    result = subprocess.run(
        ["sbatch", "--parsable", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env or job_env(),
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def submit_run(
    job_dir: Path, name: str, config: str = "config.yaml", *options: str
) -> tuple[str, Path, Path]:
    """sbatch jobs/slurm.sh for run dir JOB_DIR/NAME; its output in JOB_DIR/NAME.out."""
    run_dir, out = job_dir / name, job_dir / f"{name}.out"
    script = ["jobs/slurm.sh", str(job_dir / config), str(run_dir)]
    return sbatch(*SMALL, *options, f"--output={out}", *script), run_dir, out


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_done(job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
    """Wait until the job has ended for good (a requeued job passes through PENDING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            return fields
        time.sleep(0.5)
    pytest.fail(f"job {job_id} still {job_fields(job_id).get('JobState')} after {timeout} s")


def wait_for_line(path: Path, pattern: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        time.sleep(0.2)
    pytest.fail(f"no line matching {pattern!r} in {path} after {timeout} s")


def final_checksum(run_dir: Path) -> tuple[int, str]:
    with h5py.File(run_dir / "run.h5", "r") as f:
        done = int(f.attrs["iterations_done"])
        return done, f["checksum"][done - 1].decode()


def report(line: str) -> None:
    """One line of what a test saw, for the summary run-tests.sh prints at the end."""
    path = os.environ.get("ES_MPI_SLURM_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def stops(text: str) -> list[str]:
    """The stop lines of a job's output, e.g. 'SIGUSR1: stopped after iteration 17 of 60'."""
    return re.findall(r"\] (.*: stopped after iteration \d+ of \d+)", text)


def resumed(run_dir: Path, reference: Path, fields: dict[str, str], text: str) -> str:
    done, checksum = final_checksum(run_dir)
    same = "==" if (done, checksum) == final_checksum(reference) else "!="
    starts = [s["start"] for s in sessions(run_dir)]
    return (
        f"{'; '.join(stops(text))}; Restarts={fields['Restarts']}; sessions start at {starts}; "
        f"final iteration {done} checksum {checksum[:12]} {same} uninterrupted"
    )


def sessions(run_dir: Path) -> list[dict]:
    with h5py.File(run_dir / "run.h5", "r") as f:
        return json.loads(f.attrs["sessions"])


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory, tiny_model_dir) -> Path:
    directory = tmp_path_factory.mktemp("slurm")
    job_config(directory / "config.yaml", tiny_model_dir)
    job_config(
        directory / "config-limit.yaml", tiny_model_dir, **{"runtime.stop_margin_seconds": 50}
    )
    return directory


@pytest.fixture(scope="module")
def uninterrupted(job_dir) -> Path:
    """One 2-rank job, start to end: the reference for the interrupted ones."""
    run_dir, out = job_dir / "reference", job_dir / "reference.out"
    job = sbatch(
        *SMALL, f"--output={out}", "jobs/slurm.sh", str(job_dir / "config.yaml"), str(run_dir)
    )
    fields = wait_done(job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", out.read_text()
    return run_dir


def test_job_trains_in_one_world_of_the_tasks_slurm_started(uninterrupted):
    text = (uninterrupted.parent / "reference.out").read_text()
    assert "[es-mpi] 2 rank(s)" in text
    assert [s["ranks"] for s in sessions(uninterrupted)] == [2]
    assert final_checksum(uninterrupted)[0] == 60
    done, checksum = final_checksum(uninterrupted)
    report(f"2-rank job: world of 2 ranks, {done} iterations, checksum {checksum[:12]}")
    assert (uninterrupted / "final" / "model.safetensors").is_file()


def test_srun_without_pmi_is_refused_by_name(job_dir):
    """MpiDefault=none and no --mpi: each task is a 1-rank world; es-mpi exits 2 at once."""
    job, run_dir, out = submit_run(
        job_dir, "nopmi", "config.yaml", "--export=ALL,ES_MPI_SRUN_MPI=none"
    )
    fields = wait_done(job)
    # 2 from es-mpi; 143 when --kill-on-bad-exit ended the other task (SIGTERM) before it
    # reached the check itself (seen on CI: srun then reports 128 + 15)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] in ("2:0", "143:0"), fields
    assert "the MPI world has 1 rank(s) but SLURM_STEP_NUM_TASKS says 2" in out.read_text()
    assert not (run_dir / "run.h5").exists()
    named = out.read_text().count("but SLURM_STEP_NUM_TASKS says 2")
    report(f"srun without --mpi: job exit {fields['ExitCode']}, {named} task(s) named the mismatch")


def test_preemption_requeues_and_resumes_to_the_uninterrupted_weights(job_dir, uninterrupted):
    run_dir, out = job_dir / "preempted", job_dir / "preempted.out"
    job = sbatch(
        *SMALL, f"--output={out}", "jobs/slurm.sh", str(job_dir / "config.yaml"), str(run_dir)
    )
    wait_for_line(out, r"it 15/60")
    # --full: the batch shell, srun and every task all get it (duplicates are ignored)
    subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True)
    fields = wait_done(job)
    text = out.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text
    assert "SIGUSR1: stopped after iteration" in text and "requeueing job" in text
    assert len(sessions(run_dir)) == 2
    outcome = resumed(run_dir, uninterrupted, fields, text)
    report(f"preemption (scancel --signal=USR1 --full): {outcome}")
    assert final_checksum(run_dir) == final_checksum(uninterrupted)


def test_time_limit_requeues_and_resumes_to_the_uninterrupted_weights(job_dir, uninterrupted):
    """--time=1 and a 50 s margin: es-mpi stops itself about 10 s in (ES_MPI_JOB_END from
    squeue), exit 75, the job requeues; the next allocation finishes the run."""
    # --signal: the script's USR1@300 would come at once in a 1-minute job
    limits = ["--time=1", "--signal=USR1@5"]
    job, run_dir, out = submit_run(job_dir, "limited", "config-limit.yaml", *limits)
    fields = wait_done(job)
    text = out.read_text()
    assert fields["JobState"] == "COMPLETED" and int(fields["Restarts"]) >= 1, text
    assert "job end: stopped after iteration" in text
    assert "CANCELLED" not in text.split("requeueing")[0]  # the stop came before Slurm's kill
    report(f"time limit (--time=1, margin 50 s): {resumed(run_dir, uninterrupted, fields, text)}")
    assert final_checksum(run_dir) == final_checksum(uninterrupted)


def test_sweep_member_stopped_resumes_in_its_own_dir(job_dir, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# name overrides\nsmall es.population=2\nbase es.population=4\n")
    sweep_dir = job_dir / "sweep"
    one_rank = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-task=0"]
    out = job_dir / "sweep-%a.out"
    env = job_env(CONFIG=str(job_dir / "config.yaml"))
    submitted = subprocess.run(
        ["bash", "jobs/sweep.sh", "--submit", "--parsable", *one_rank, f"--output={out}",
         str(sweep), str(sweep_dir)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    array = submitted.stdout.strip().split(";")[0]
    member_out = job_dir / "sweep-1.out"
    wait_for_line(member_out, r"it 10/60")
    subprocess.run(["scancel", "--signal=USR1", "--full", f"{array}_1"], check=True)
    assert wait_done(f"{array}_0")["JobState"] == "COMPLETED"
    fields = wait_done(f"{array}_1")
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", member_out.read_text()
    assert len(sessions(sweep_dir / "base")) == 2 and len(sessions(sweep_dir / "small")) == 1
    with h5py.File(sweep_dir / "small" / "run.h5", "r") as f:
        assert f["rewards"].shape[1] == 2  # the line's override reached the member
    member = sweep_dir / "base"
    report(
        f"sweep member {array}_1: {'; '.join(stops(member_out.read_text()))}; Restarts="
        f"{fields['Restarts']}; sessions start at {[x['start'] for x in sessions(member)]}; "
        f"final iteration {final_checksum(member)[0]}; member 0 untouched (1 session)"
    )

    # An --array that does not match the file fails at once in every member, by name.
    wrong = sbatch(*one_rank, "--array=0-2", f"--output={job_dir / 'wrong-%a.out'}",
                   "jobs/sweep.sh", str(sweep), str(sweep_dir), env=env)  # fmt: skip
    assert wait_done(f"{wrong}_0")["ExitCode"] == "2:0"
    assert "--array ends at 2 but" in (job_dir / "wrong-0.out").read_text()


def test_site_mpi_library_is_used_through_slurm_pmi(tmp_path):
    """The site's MPI instead of the wheel: an environment without the mpich wheel in its
    prefix (what `make install-site-mpi` leaves) loads libmpi.so.12 from LD_LIBRARY_PATH, as a
    `module load` sets it. Debian's MPICH stands in for the site's."""
    site_lib = Path("/usr/lib/x86_64-linux-gnu/libmpich.so.12")
    if not site_lib.exists():
        pytest.skip("Debian's libmpich12 is not installed (tests/slurm/cluster.sh install)")
    libdir = tmp_path / "site-mpi"
    libdir.mkdir()
    (libdir / "libmpi.so.12").symlink_to(site_lib)
    venv = tmp_path / "venv"  # a prefix without the wheel's libmpi; packages from ours
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
    env = job_env(LD_LIBRARY_PATH=str(libdir), PYTHONPATH=f"{site_packages}:{ROOT / 'src'}")
    result = subprocess.run(
        ["srun", "--mpi=pmi2", "-n", "2", str(venv / "bin" / "python"), "-m", "es_mpi", "doctor"],
        capture_output=True, text=True, env=env, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("MPICH Version:") == 2 and "4.0" in result.stdout
    assert "libmpich.so.12" in result.stdout and ".venv/lib/libmpi" not in result.stdout
    assert "ok, 2 rank(s) in one MPI world" in result.stdout
    library = re.search(r"MPICH Version:\s*(\S+)", result.stdout).group(1)
    report(f"site MPI: srun --mpi=pmi2 -n 2 es-mpi doctor: MPICH {library} from {site_lib}, ok")
