"""What the launcher and the batch scheduler say about this process: how many ranks were
started (to compare with the MPI world) and when the job ends (to stop before it).

Read from the environment only, once at start-up; nothing here talks to MPI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# Set by an mpiexec/mpirun in every process it starts: MPICH/Hydra (and Intel MPI), Open MPI.
# Under one of these, Slurm's step variables count the launcher's proxies, not the ranks.
_MPIEXEC_MARKERS = ("MPI_LOCALNRANKS", "PMI_HOSTNAME", "OMPI_COMM_WORLD_SIZE")
_MPIEXEC_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class ExpectedRanks:
    count: int
    source: str  # the variable (or file) that said so, for the error message


def expected_ranks(env: Mapping[str, str] | None = None) -> list[ExpectedRanks]:
    """Every rank count the launcher or scheduler announced for this job step.

    ES_MPI_EXPECTED_RANKS overrides them all (a number, or `any` to check nothing).
    """
    env = os.environ if env is None else env
    override = env.get("ES_MPI_EXPECTED_RANKS", "").strip()
    if override:
        return [] if override == "any" else [_count(override, "ES_MPI_EXPECTED_RANKS")]
    found = [_count(env[var], var) for var in _MPIEXEC_SIZE_VARS if env.get(var, "").strip()]
    under_mpiexec = any(var in env for var in _MPIEXEC_MARKERS)
    if "SLURM_STEP_NUM_TASKS" in env and not under_mpiexec:  # started by srun itself
        found.append(_count(env["SLURM_STEP_NUM_TASKS"], "SLURM_STEP_NUM_TASKS"))
    elif env.get("PBS_NODEFILE") and "SLURM_JOB_ID" not in env:
        found.append(_pbs_mpiprocs(env["PBS_NODEFILE"]))
    return found


def _count(text: str, source: str) -> ExpectedRanks:
    try:
        return ExpectedRanks(int(text), source)
    except ValueError:
        raise ValueError(f"{source}={text!r} is not a number of ranks") from None


def _pbs_mpiprocs(nodefile: str) -> ExpectedRanks:
    """PBS writes one line per MPI process (the select statement's mpiprocs) to PBS_NODEFILE."""
    try:
        with open(nodefile) as f:
            lines = [line for line in f if line.strip()]
    except OSError:
        return ExpectedRanks(0, "PBS_NODEFILE (unreadable)")
    return ExpectedRanks(len(lines), f"PBS_NODEFILE ({nodefile}: mpiprocs in total)")


def world_size_error(world_size: int, env: Mapping[str, str] | None = None) -> str | None:
    """A one-line explanation when the MPI world differs from the announced rank count (or
    when a variable that announces it is not a number)."""
    try:
        announced = expected_ranks(env)
    except ValueError as exc:
        return str(exc)
    for expected in announced:
        if expected.count > 0 and expected.count != world_size:
            return (
                f"the MPI world has {world_size} rank(s) but {expected.source} says "
                f"{expected.count}: the launcher and the MPI library mpi4py loaded do not "
                "talk to each other (under Slurm: srun --mpi=pmi2, see ES_MPI_SRUN_MPI; "
                "check with `es-mpi doctor`; ES_MPI_EXPECTED_RANKS=any skips this check)"
            )
    return None


def job_end_time(env: Mapping[str, str] | None = None) -> float | None:
    """The job's end as a Unix time: ES_MPI_JOB_END (set by the job scripts from the
    scheduler) or SLURM_JOB_END_TIME (Slurm 23.02 and later). None when neither is set."""
    env = os.environ if env is None else env
    for var in ("ES_MPI_JOB_END", "SLURM_JOB_END_TIME"):
        text = env.get(var, "").strip()
        if text:
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"{var}={text!r} is not a Unix time in seconds") from None
    return None
