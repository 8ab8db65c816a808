"""A plug-in task whose scorer raises on MPI rank 1 (for the failure test)."""

from mpi4py import MPI

from es_mpi.tasks.arithmetic import ArithmeticTask


class FailOnRankOne(ArithmeticTask):
    name = "fail-on-rank-one"

    def score(self, completion, example):
        if MPI.COMM_WORLD.Get_rank() == 1:
            raise ValueError("boom on rank 1")
        return super().score(completion, example)
