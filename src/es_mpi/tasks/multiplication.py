"""Multiplication (the Gemma replication): 'a*b=' -> the exact product, reward 1 or 0.

With task.multiplication.answer_pattern the answer is the first group of the pattern's last
match in the completion (the replication extracts '<(\\d+)>' from a chat answer); without it
the whole stripped completion must be the product.
"""

from __future__ import annotations

import re

import numpy as np

from ..config import TaskConfig
from .base import Example, train_without_heldout


def _draw(rng: np.random.Generator, digits: int, count: int) -> np.ndarray:
    low = 10 ** (digits - 1) if digits > 1 else 0
    return rng.integers(low, 10**digits, size=count)


class MultiplicationTask:
    name = "multiplication"

    def __init__(self, cfg: TaskConfig) -> None:
        m = cfg.multiplication
        self.pattern = re.compile(m.answer_pattern) if m.answer_pattern else None
        rng = np.random.default_rng(cfg.data_seed)

        def draw(count: int) -> list[Example]:
            a = _draw(rng, m.digits_a, count).tolist()
            b = _draw(rng, m.digits_b, count).tolist()
            return [
                Example(m.template.format(a=x, b=y), str(x * y)) for x, y in zip(a, b, strict=True)
            ]

        examples = draw(cfg.train_size + cfg.test_size)
        self.test = examples[cfg.train_size :]
        self.train = train_without_heldout(
            examples[: cfg.train_size], self.test, draw, cfg.train_size
        )

    def answer(self, completion: str) -> str | None:
        if self.pattern is None:
            return completion.strip()
        last = None
        for last in self.pattern.finditer(completion):  # noqa: B007 (the last one counts)
            pass
        return None if last is None else last.group(1)

    def score(self, completion: str, example: Example) -> float:
        return 1.0 if self.answer(completion) == example.answer else 0.0
