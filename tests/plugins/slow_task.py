"""A plug-in task that scores like arithmetic but takes a fixed time per completion, so that
a run of the tiny model lasts long enough to be preempted (tests/test_slurm.py)."""

import time

from es_mpi.tasks.arithmetic import ArithmeticTask

SECONDS_PER_COMPLETION = 0.02


class SlowArithmetic(ArithmeticTask):
    name = "slow-arithmetic"

    def score(self, completion, example):
        time.sleep(SECONDS_PER_COMPLETION)
        return super().score(completion, example)
