"""A reward for cost benchmarks (`benchmarks/scale.py`): a checksum of the completion's
characters (sum of code points mod 97). Any two different completions of random models almost
surely score apart on it, so every update draws noise; Countdown's problems give the prompts.
Used as task.name 'scale_task:CompletionChecksum' with benchmarks/ on PYTHONPATH.
"""

from __future__ import annotations

from es_mpi.config import TaskConfig
from es_mpi.tasks.base import Example
from es_mpi.tasks.countdown import CountdownTask


class CompletionChecksum:
    name = "completion_checksum"

    def __init__(self, cfg: TaskConfig) -> None:
        problems = CountdownTask(cfg)
        self.train, self.test = problems.train, problems.test

    def score(self, completion: str, example: Example) -> float:
        return float(sum(map(ord, completion)) % 97)
