"""The Task protocol every reward task implements (built-in or a user's plug-in)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..config import ConfigError


@dataclass(frozen=True)
class Example:
    """One prompt and whatever the scorer needs to judge a completion of it."""

    prompt: str
    answer: Any


@runtime_checkable
class Task(Protocol):
    """A reward task: a train split, a held-out split and a scorer.

    `score` sees the completion only (never the prompt: docs/design.md, defect 5) and must be
    fast and safe on hostile model output. Optional: a true attribute `report_kl` asks the
    trainer to score KL(model || base) at each held-out evaluation (see `reports_kl`).
    """

    name: str
    train: list[Example]
    test: list[Example]

    def score(self, completion: str, example: Example) -> float: ...


def reports_kl(task: Task) -> bool:
    """The optional `report_kl` of a task (conciseness sets it; plug-ins may)."""
    return bool(getattr(task, "report_kl", False))


def train_without_heldout(
    candidates: list[Example],
    test: list[Example],
    draw_more: Callable[[int], list[Example]],
    train_size: int,
) -> list[Example]:
    """The first `train_size` examples whose prompt no held-out example has: `candidates` in
    order, then fresh draws. A small problem space repeats problems, and a held-out problem
    seen in training is not held out. ConfigError when more than half of the draws are
    held-out problems: the held-out split then covers most of the problem space."""
    held_out = {e.prompt for e in test}
    drawn = list(candidates)
    train = [e for e in drawn if e.prompt not in held_out]
    while len(train) < train_size and len(train) * 2 >= len(drawn):
        more = draw_more(train_size)
        drawn += more
        train += [e for e in more if e.prompt not in held_out]
    if len(train) * 2 < len(drawn):
        raise ConfigError(
            f"config field 'task.test_size': the {len(held_out)} distinct held-out problems "
            f"are {len(drawn) - len(train)} of {len(drawn)} problems drawn for training: "
            "they cover most of the problem space; lower test_size or widen the problems "
            "(more digits)"
        )
    return train[:train_size]


def read_json_records(path: str | Path, field: str) -> list:
    """The non-empty JSON list in a user's data file; a missing, unreadable or malformed file
    is a ConfigError naming the config field and the file (exit 2, nothing started)."""
    where = f"config field '{field}'"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}: no file '{path}'")
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: '{path}' is not readable JSON ({exc})") from exc
    if not isinstance(records, list) or not records:
        raise ConfigError(f"{where}: '{path}' must hold a non-empty JSON list of records")
    return records
