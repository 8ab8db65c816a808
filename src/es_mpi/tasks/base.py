"""The Task protocol every reward task implements (built-in or a user's plug-in)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Example:
    """One prompt and whatever the scorer needs to judge a completion of it."""

    prompt: str
    answer: Any


@runtime_checkable
class Task(Protocol):
    """A reward task: a train split, a held-out split and a scorer.

    `score` sees the completion only (never the prompt: DESIGN.md, defect 5) and must be
    fast and safe on hostile model output.
    """

    name: str
    train: list[Example]
    test: list[Example]

    def score(self, completion: str, example: Example) -> float: ...
