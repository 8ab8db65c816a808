"""Integer addition with exact-match reward and digit-wise partial credit."""

from __future__ import annotations

import numpy as np

from ..config import TaskConfig
from .base import Example, train_without_heldout


def partial_match(completion: str, answer: str) -> float:
    """1.0 for an exact answer; else half the share of characters right at their position."""
    got = completion.strip()
    if got == answer:
        return 1.0
    if not got:
        return 0.0
    same = sum(a == b for a, b in zip(got, answer, strict=False))
    return 0.5 * same / max(len(got), len(answer))


class ArithmeticTask:
    """'a+b=' -> 'c' with `digits`-digit operands, problems generated from `data_seed`."""

    name = "arithmetic"

    def __init__(self, cfg: TaskConfig) -> None:
        rng = np.random.default_rng(cfg.data_seed)
        digits = cfg.arithmetic.digits
        low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits

        def draw(count: int) -> list[Example]:
            pairs = rng.integers(low, high, size=(count, 2))
            return [Example(f"{a}+{b}=", str(a + b)) for a, b in pairs.tolist()]

        examples = draw(cfg.train_size + cfg.test_size)
        self.test = examples[cfg.train_size :]
        self.train = train_without_heldout(
            examples[: cfg.train_size], self.test, draw, cfg.train_size
        )

    def score(self, completion: str, example: Example) -> float:
        return partial_match(completion, example.answer)
