"""`es-mpi doctor`: what each rank sees before a long job is trusted with it: the MPI
library mpi4py loaded (and from where), the world size against the launcher's and the
scheduler's count, the node-local rank, the device it would train on, the torch build."""

from __future__ import annotations

import os
import socket
from typing import Any

from .comm import Comm
from .launch import expected_ranks, world_size_error


def loaded_libmpi() -> str:
    """Path of the MPI library mapped into this process (the wheel's, or the site's)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libmpi" in path or "/libmpich" in path:
                    return path
    except OSError:
        pass
    return "-"


def rank_report(comm: Comm, device: str) -> dict[str, Any]:
    """This rank's facts; `problems` lists what would make a training run fail or mislead."""
    import torch

    from .engine import cuda_problem, pick_device

    problems = []
    size_error = world_size_error(comm.size)
    if size_error:
        problems.append(size_error)
    library = "none (one process, no MPI)"
    if comm.mpi is not None:
        from mpi4py import MPI

        library = MPI.Get_library_version().splitlines()[0].strip()
    try:
        chosen = str(pick_device(device, comm.local_rank))
    except RuntimeError as exc:
        chosen = "-"
        problems.append(str(exc))
    if chosen.startswith("cuda"):
        chosen += f" ({torch.cuda.get_device_name(torch.device(chosen))})"
    elif device == "auto" and _job_has_gpus():
        problems.append(f"the job requested GPUs but this rank would use the CPU: {cuda_problem()}")
    return {
        "host": socket.gethostname(),
        "rank": comm.rank,
        "size": comm.size,
        "local_rank": comm.local_rank,
        "mpi": library,
        "libmpi": loaded_libmpi(),
        "launcher": ", ".join(f"{e.source}={e.count}" for e in expected_ranks()) or "-",
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES", "-"),
        "torch": f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})",
        "device": chosen,
        "problems": problems,
    }


def _job_has_gpus() -> bool:
    """Slurm's GPU variables (a count, or TYPE:COUNT) say the job was given GPUs."""
    for var in ("SLURM_GPUS_PER_TASK", "SLURM_GPUS_ON_NODE"):
        count = os.environ.get(var, "").rsplit(":", 1)[-1]
        if count.isdigit() and int(count) > 0:
            return True
    return False


def doctor(comm: Comm, device: str) -> bool:
    """Print every rank's report (rank 0, or each process when it is alone); True if sound."""
    reports = comm.gather(rank_report(comm, device))
    if not comm.is_main:
        return True
    for r in reports:
        print(
            f"rank {r['rank']}/{r['size']} on {r['host']} (local {r['local_rank']}): "
            f"{r['mpi']} [{r['libmpi']}]; launcher/scheduler {r['launcher']}; "
            f"torch {r['torch']}; CUDA_VISIBLE_DEVICES {r['cuda_visible']}; "
            f"device {r['device']}",
            flush=True,
        )
    problems = sorted({p for r in reports for p in r["problems"]})
    for problem in problems:
        print(f"es-mpi doctor: problem: {problem}", flush=True)
    if not problems:
        print(f"es-mpi doctor: ok, {comm.size} rank(s) in one MPI world", flush=True)
    return not problems
