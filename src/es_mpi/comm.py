"""The MPI layer: rank/world read once, population dealing, scalar allgather, abort.

Without mpiexec (or without a loadable MPI library) everything runs as a single process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def _launched_with_several_ranks() -> bool:
    for var in _LAUNCHER_SIZE_VARS:
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def deal_members(population: int, world_size: int, rank: int, group: int = 1) -> range:
    """Contiguous member indices of `rank`: whole groups of `group` members, spread evenly.

    Every member belongs to exactly one rank for any population and world size; ranks
    beyond the number of groups get an empty range but still join the collectives.
    """
    n_groups = -(-population // group)
    first = rank * n_groups // world_size
    last = (rank + 1) * n_groups // world_size
    return range(min(first * group, population), min(last * group, population))


class Comm:
    """A communicator (mpi4py, or None for a single process) with the few calls ES needs."""

    def __init__(self, mpi_comm: Any | None = None) -> None:
        self.mpi = mpi_comm
        self.rank = mpi_comm.Get_rank() if mpi_comm is not None else 0
        self.size = mpi_comm.Get_size() if mpi_comm is not None else 1
        self.is_main = self.rank == 0
        self.local_rank = self._local_rank()

    @classmethod
    def world(cls) -> Comm:
        """COMM_WORLD when mpi4py and an MPI library are present, else a serial communicator."""
        try:
            from mpi4py import MPI
        except (ImportError, RuntimeError) as exc:
            if _launched_with_several_ranks():
                raise RuntimeError(
                    f"launched by mpiexec with several ranks but mpi4py cannot load MPI: {exc}"
                ) from exc
            return cls(None)
        return cls(MPI.COMM_WORLD)

    @classmethod
    def serial(cls) -> Comm:
        return cls(None)

    def _local_rank(self) -> int:
        if self.mpi is None:
            return 0
        from mpi4py import MPI

        node = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return node.Get_rank()
        finally:
            node.Free()

    def my_members(self, population: int, group: int = 1) -> range:
        return deal_members(population, self.size, self.rank, group)

    def bcast(self, obj: Any) -> Any:
        return obj if self.mpi is None else self.mpi.bcast(obj, root=0)

    def allgather(self, obj: Any) -> list[Any]:
        return [obj] if self.mpi is None else self.mpi.allgather(obj)

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj] if self.mpi is None else self.mpi.gather(obj, root=0)

    def barrier(self) -> None:
        if self.mpi is not None:
            self.mpi.Barrier()

    def gather_rewards(
        self, members: range, seeds: np.ndarray, rewards: list[float], population: int
    ) -> np.ndarray:
        """Allgather (member index, seed, reward) triples into a vector indexed by member.

        Only these scalars cross the network (docs/design.md, invariant 4). The seeds are checked
        against this rank's own: a mismatch means ranks disagree on the run's config.
        """
        local = [(n, int(seeds[n]), float(r)) for n, r in zip(members, rewards, strict=True)]
        full = np.full(population, np.nan)
        seen = np.zeros(population, dtype=bool)
        for part in self.allgather(local):
            for index, seed, reward in part:
                if seen[index] or seed != int(seeds[index]):
                    raise RuntimeError(f"ranks disagree on member {index} (seed or dealing)")
                seen[index] = True
                full[index] = reward
        if not seen.all():
            raise RuntimeError(f"members without a reward: {np.flatnonzero(~seen).tolist()[:10]}")
        return full

    def abort(self, code: int = 1) -> None:
        """End the whole job now: no rank is left waiting in a collective."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.mpi is not None and self.size > 1:
            self.mpi.Abort(code)
        os._exit(code)
