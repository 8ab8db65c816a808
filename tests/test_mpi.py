"""MPI tests (pytest-mpi): pass at any rank count, run under mpiexec -n 2 and -n 3."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import small_overrides


@pytest.fixture
def comm_world():
    from mpi4py import MPI

    from es_mpi.comm import Comm

    return Comm(MPI.COMM_WORLD)


@pytest.fixture
def shared_tmp(comm_world):
    """A temporary directory created by rank 0 and known to every rank."""
    path = tempfile.mkdtemp(prefix="es-mpi-test-") if comm_world.is_main else None
    return Path(comm_world.bcast(path))


@pytest.fixture
def shared_model_dir(comm_world, shared_tmp) -> Path:
    """The tiny test model, built by rank 0 in the shared directory."""
    from es_mpi.tiny_model import build_tiny_llama

    model_dir = shared_tmp / "model"
    if comm_world.is_main:
        build_tiny_llama(model_dir, hidden=32, layers=2, heads=2)
    comm_world.barrier()
    return model_dir


@pytest.mark.mpi(min_size=2)
def test_rewards_placed_by_member_index(comm_world):
    population = 7
    seeds = np.arange(population) * 3 + 1
    members = comm_world.my_members(population)
    local = [float(100 + n) for n in members]
    rewards = comm_world.gather_rewards(members, seeds, local, population)
    np.testing.assert_array_equal(rewards, 100.0 + np.arange(population))


LOWRANK = {"es.mode": "lowrank", "es.members_per_batch": 3, "es.lowrank_vectors": "full"}
FAST_BF16 = {"runtime.decoder": "fast", "model.eval_dtype": "bfloat16"}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["full", "lowrank", "fast-bf16"])
def test_rank_count_invariance_in_process(comm_world, shared_tmp, shared_model_dir, mode):
    """The same config trained on all ranks and on rank 0 alone: identical master weights
    (also with the fast decoder on a bfloat16 evaluation copy)."""
    from mpi4py import MPI

    from es_mpi.comm import Comm
    from es_mpi.config_load import load_config
    from es_mpi.session import start_run

    by_mode = {"lowrank": LOWRANK, "fast-bf16": FAST_BF16}
    extra = {"es.population": 7, "es.iterations": 3, **by_mode.get(mode, {})}
    cfg = load_config(None, small_overrides(shared_model_dir, **extra))
    reference = None
    if comm_world.is_main:
        alone = shared_tmp / f"alone-{mode}"
        reference = start_run(cfg, alone, False, Comm(MPI.COMM_SELF)).checksum()
    reference = comm_world.bcast(reference)
    weights = start_run(cfg, shared_tmp / f"together-{mode}", False, comm_world)
    checksums = comm_world.allgather(weights.checksum())
    assert checksums == [reference] * comm_world.size


@pytest.mark.mpi(min_size=2)
def test_replicas_that_drift_apart_are_detected_on_every_rank(
    comm_world, shared_tmp, shared_model_dir
):
    import torch

    from es_mpi.config_load import load_config
    from es_mpi.engine import Engine
    from es_mpi.tasks import make_task
    from es_mpi.trainer import Trainer

    cfg = load_config(None, small_overrides(shared_model_dir, **{"runtime.verify_every": 10}))
    engine = Engine.load(cfg, comm_world)
    trainer = Trainer(engine, make_task(cfg.task), shared_tmp, log=None)
    assert trainer.agreed_checksum(9) == engine.weights.checksum()  # all agree
    if comm_world.rank == 1:
        with torch.no_grad():
            next(iter(engine.weights.master.values()))[0].add_(1e-6)
    assert trainer.agreed_checksum(8) in ("", engine.weights.checksum())  # not a check iteration
    with pytest.raises(RuntimeError, match=r"ranks \[1\] disagree"):
        trainer.agreed_checksum(19)
