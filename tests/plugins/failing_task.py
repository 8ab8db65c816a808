"""Plug-in tasks that fail on MPI rank 1 (for the failure tests). When ES_MPI_FAIL_STAMP
is set, the failing rank writes the time of its failure there (time-to-exit measurements)."""

import os
import time

from mpi4py import MPI

from es_mpi.tasks.arithmetic import ArithmeticTask


def _stamp() -> None:
    path = os.environ.get("ES_MPI_FAIL_STAMP")
    if path and not os.path.exists(path):
        with open(path, "w") as f:
            f.write(repr(time.time()))


class FailOnRankOne(ArithmeticTask):
    name = "fail-on-rank-one"

    def score(self, completion, example):
        if MPI.COMM_WORLD.Get_rank() == 1:
            _stamp()
            raise ValueError("boom on rank 1")
        return super().score(completion, example)


class NaNOnRankOne(ArithmeticTask):
    name = "nan-on-rank-one"

    def score(self, completion, example):
        if MPI.COMM_WORLD.Get_rank() == 1:
            _stamp()
            return float("nan")
        return super().score(completion, example)
