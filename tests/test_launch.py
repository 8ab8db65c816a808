"""What the launcher and scheduler announce (launch.py), and the stop requests (stopping.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import run_cli, small_overrides
from es_mpi import stopping
from es_mpi.launch import expected_ranks, job_end_time, world_size_error

# Environments seen on Slurm 22.05 (tests/test_slurm.py's cluster) and from Hydra's mpiexec.
SRUN_PMI2 = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "PMI_SIZE": "2", "PMI_RANK": "0"}
SRUN_NO_PMI = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
MPIEXEC_IN_SLURM = {  # Hydra's proxies are a 1-task step; the ranks are its children
    "SLURM_STEP_NUM_TASKS": "1",
    "PMI_SIZE": "2",
    "MPI_LOCALNRANKS": "2",
    "PMI_HOSTNAME": "n1",
}


def test_srun_without_pmi_is_a_world_size_error():
    assert world_size_error(2, SRUN_PMI2) is None
    message = world_size_error(1, SRUN_NO_PMI)
    assert "1 rank(s) but SLURM_STEP_NUM_TASKS says 2" in message and "--mpi=pmi2" in message


def test_mpiexec_inside_a_slurm_job_counts_its_own_ranks():
    assert [e.source for e in expected_ranks(MPIEXEC_IN_SLURM)] == ["PMI_SIZE"]
    assert world_size_error(2, MPIEXEC_IN_SLURM) is None
    assert "PMI_SIZE says 2" in world_size_error(1, MPIEXEC_IN_SLURM)  # a foreign mpiexec


def test_pbs_nodefile_lines_are_the_rank_count(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\nn2\nn2\n")
    env = {"PBS_NODEFILE": str(nodefile), "PMI_SIZE": "4", "PMI_HOSTNAME": "n1"}
    assert world_size_error(4, env) is None
    assert "PBS_NODEFILE" in world_size_error(2, {**env, "PMI_SIZE": "2"})


def test_expected_ranks_override_and_bad_values():
    assert world_size_error(1, {**SRUN_NO_PMI, "ES_MPI_EXPECTED_RANKS": "any"}) is None
    assert "ES_MPI_EXPECTED_RANKS says 3" in world_size_error(2, {"ES_MPI_EXPECTED_RANKS": "3"})
    with pytest.raises(ValueError, match="SLURM_STEP_NUM_TASKS='x'"):
        expected_ranks({"SLURM_STEP_NUM_TASKS": "x"})
    assert expected_ranks({}) == []


def test_job_end_from_the_scripts_or_slurm():
    assert job_end_time({}) is None
    assert job_end_time({"ES_MPI_JOB_END": "", "SLURM_JOB_END_TIME": "1700000000"}) == 1.7e9
    assert job_end_time({"ES_MPI_JOB_END": "1800000000", "SLURM_JOB_END_TIME": "1"}) == 1.8e9
    with pytest.raises(ValueError, match="ES_MPI_JOB_END"):
        job_end_time({"ES_MPI_JOB_END": "tomorrow"})


def test_job_end_stop_keeps_the_margin_and_the_checkpoint_time():
    clock = stopping.StopWatch(0.0, time.time() + 100.0, margin_seconds=60.0)
    assert clock.reason() is None  # no estimate before the first iteration
    clock.loop_seconds.append(30.0)
    assert clock.reason() is None  # 30 s of the 40 s left before the margin
    clock.checkpoint_seconds = 15.0
    assert clock.reason() == "job end"


def test_stop_signals_are_recorded_once_and_repeats_ignored():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stopping._received.clear()
        stopping.listen_for_stop_signals()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat (scancel --full, srun, the shell)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stopping.stop_signal() == "SIGUSR1"
        assert stopping.StopWatch(0.0, None, 0.0).reason() == "SIGUSR1"
    finally:
        stopping._received.clear()
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_world_size_error_stops_the_cli_before_anything_is_written(tiny_model_dir, tmp_path):
    args = ["train", "--run-dir", str(tmp_path / "run")]
    for item in small_overrides(tiny_model_dir):
        args += ["--set", item]
    result = run_cli(args, env={**os.environ, **SRUN_NO_PMI})
    assert result.returncode == 2
    assert "es-mpi: error: the MPI world has 1 rank(s) but SLURM_STEP_NUM_TASKS" in result.stderr
    assert not (tmp_path / "run").exists()


def test_doctor_reports_every_rank_and_names_a_cpu_only_torch():
    ok = run_cli(["doctor"], ranks=2)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("MPICH Version:") == 2 and "launcher/scheduler PMI_SIZE=2" in ok.stdout
    assert "ok, 2 rank(s) in one MPI world" in ok.stdout
    import torch

    if torch.version.cuda is None:
        cuda = run_cli(["doctor", "--device", "cuda"], ranks=2)
        assert cuda.returncode == 2
        assert "problem: runtime.device is 'cuda' but this torch" in cuda.stdout
        assert "is a CPU-only build" in cuda.stdout
