"""Batch job scripts: syntax, and the command lines they render (ES_MPI_DRY_RUN=1)."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import ROOT

JOBS = ROOT / "jobs"


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


@pytest.mark.parametrize("script", ["slurm.sh", "pbs.sh", "sweep.sh"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(JOBS / script)]).returncode == 0


def test_slurm_renders_srun_and_resumes_an_existing_run(tmp_path):
    run_dir = tmp_path / "run"
    assert render("slurm.sh", "cfg.yaml", str(run_dir)) == (
        "srun --ntasks-per-node=4 --cpus-per-task=8 --gpus-per-task=1 es-mpi train "
        f"--config cfg.yaml --run-dir {run_dir} --device auto"
    )
    run_dir.mkdir()
    (run_dir / "run.h5").write_bytes(b"")
    cpu = render(
        "slurm.sh",
        "cfg.yaml",
        str(run_dir),
        SLURM_NTASKS_PER_NODE="2",
        SLURM_CPUS_PER_TASK="1",
        GPUS_PER_TASK="0",
        DEVICE="cpu",
    )
    assert cpu == (
        f"srun --ntasks-per-node=2 --cpus-per-task=1 es-mpi resume --run-dir {run_dir} --device cpu"
    )


def test_pbs_renders_mpiexec_with_ppn(tmp_path):
    out = render("pbs.sh", "cfg.yaml", str(tmp_path / "r"), NODES="3")
    assert out == (
        f"mpiexec -n 12 --ppn 4 es-mpi train --config cfg.yaml --run-dir {tmp_path / 'r'} "
        "--device auto"
    )


def test_sweep_task_takes_its_line(tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# comment\n\na es.population=8\nb es.sigma=0.2 es.rank=4\n")
    out = render("sweep.sh", str(sweep), str(tmp_path / "s"), SLURM_ARRAY_TASK_ID="1")
    assert out == (
        f"srun es-mpi train --config configs/default.yaml --run-dir {tmp_path / 's' / 'b'} "
        "--set es.sigma=0.2 --set es.rank=4"
    )
    missing = subprocess.run(
        ["bash", str(JOBS / "sweep.sh"), str(sweep), str(tmp_path / "s")],
        env={**os.environ, "ES_MPI_DRY_RUN": "1", "SLURM_ARRAY_TASK_ID": "5"},
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no line 5" in missing.stderr
