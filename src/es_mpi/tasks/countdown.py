"""Countdown (Qiu et al. 2025): combine the given numbers into an expression equal to the target.

Reward as in the paper: 0.1 * format + answer. Format is 1.0 for
`<think>...</think>\\n<answer>...</answer>`, else 0.1 for a think block plus 0.5 for an answer
block. Answer is 1.0 when the last `<answer>` uses exactly the given numbers (each once) and
evaluates to the target within 1e-5, by the safe evaluator (never eval()).

Only the completion is scored (DESIGN.md, defect 5). A prompt template that ends with the
opening `<think>` (as the paper's does) has that tag counted as the completion's first token,
since the model cannot write it itself; nothing else of the prompt is seen by the scorer.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from ..config import ConfigError, TaskConfig
from .base import Example
from .safe_arith import evaluate

THINK_OPEN = "<think>"
# The completion the shipped tiny model is pretrained to write after "{numbers}={target}<think>".
TINY_ANSWER_FORMAT = "</think>\n<answer>{solution}</answer>"
_FULL_FORMAT = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
MAX_COMPLETION_CHARS = 4096


def format_score(text: str) -> float:
    if _FULL_FORMAT.match(text):
        return 1.0
    score = 0.0
    if "<think>" in text and "</think>" in text:
        score += 0.1
    if "<answer>" in text and "</answer>" in text:
        score += 0.5
    return score


def number_overlap(used: list[int], numbers: list[int]) -> float:
    """Given numbers the expression uses (multiset match) / max(numbers given, numbers used):
    1.0 exactly when it uses each given number once and nothing else."""
    matched = sum((Counter(used) & Counter(numbers)).values())
    return matched / max(len(used), len(numbers))


def closeness(value: float, target: float) -> float:
    """1 - |value - target| / max(|target|, 1), floored at 0: 1 on the target, 0 at a miss as
    large as the target itself."""
    return max(0.0, 1.0 - abs(value - target) / max(abs(target), 1.0))


def answer_score(
    text: str,
    numbers: list[int],
    target: float,
    partial: float = 0.0,
    graded: bool = False,
    near: bool = False,
) -> float:
    """1.0 for a right answer; `partial` for one that uses exactly the given numbers but
    misses the target (0 in the paper's reward); with `graded`, partial x number_overlap for
    any parseable answer that is not right; with `near`, the partial credit is also
    multiplied by closeness(value, target)."""
    answers = _ANSWER.findall(text)
    if not answers:
        return 0.0
    result = evaluate(answers[-1])
    if result is None:
        return 0.0
    value, used = result
    overlap = number_overlap(used, numbers)
    if overlap == 1.0 and abs(value - target) < 1e-5:
        return 1.0
    credit = partial * (overlap if graded else float(overlap == 1.0))
    return credit * closeness(value, target) if near else credit


def countdown_reward(
    completion: str,
    numbers: list[int],
    target: float,
    prefix: str = "",
    partial: float = 0.0,
    graded: bool = False,
    near: bool = False,
) -> float:
    """0.1 * format + answer on prefix + completion (prefix: an opening tag ending the prompt).
    Completions over MAX_COMPLETION_CHARS score 0 without being parsed."""
    if len(completion) > MAX_COMPLETION_CHARS:
        return 0.0
    text = prefix + completion
    return 0.1 * format_score(text) + answer_score(text, numbers, target, partial, graded, near)


def _random_expression(rng: np.random.Generator, numbers: list[int]) -> tuple[str, float] | None:
    """Combine the numbers in a random order and tree with + - * /; None if not a nice integer."""
    items = [(str(n), float(n)) for n in rng.permutation(numbers).tolist()]
    while len(items) > 1:
        i = int(rng.integers(len(items) - 1))
        (ea, va), (eb, vb) = items[i], items[i + 1]
        op = "+-*/"[int(rng.integers(4))]
        if op == "/" and (vb == 0 or va % vb != 0):
            op = "+"
        value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else 0.0}[op]
        items[i : i + 2] = [(f"({ea}{op}{eb})", value)]
    expr, value = items[0]
    if value <= 0 or value != int(value):
        return None
    return expr[1:-1] if expr.startswith("(") and len(numbers) > 1 else expr, value


def generate_problems(count: int, seed: int, sizes: tuple[int, int], number_max: int) -> list[dict]:
    """Problems in the paper's record format, each with one correct solution."""
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    while len(records) < count:
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        numbers = rng.integers(1, number_max + 1, size=size).tolist()
        made = _random_expression(rng, numbers)
        if made is None:
            continue
        expr, value = made
        records.append(
            {"id": len(records), "numbers": numbers, "target": str(int(value)), "solution": expr}
        )
    return records


def problem_key(record: dict) -> tuple[tuple[int, ...], float]:
    """What makes two problems the same: their numbers (as a multiset) and target."""
    return tuple(sorted(int(n) for n in record["numbers"])), float(record["target"])


def generated_split(cfg: TaskConfig) -> tuple[list[dict], list[dict]]:
    """Held-out problems at a fixed place in the generated stream, so they do not move with
    train_size; training problems are the others, minus any the held-out split also asks
    (the problem space is small: with the defaults 89 of the first 2,000 repeat one)."""
    c = cfg.countdown
    start, end = c.heldout_start, c.heldout_start + cfg.test_size
    count = end + cfg.train_size
    while count <= 100 * (end + cfg.train_size):
        records = generate_problems(
            count, cfg.data_seed, (c.min_numbers, c.max_numbers), c.number_max
        )
        test = records[start:end]
        held_out = {problem_key(r) for r in test}
        train = [r for r in records[:start] + records[end:] if problem_key(r) not in held_out]
        if len(train) >= cfg.train_size:
            return train[: cfg.train_size], test
        count += cfg.train_size  # the stream is prefix-stable: a longer one extends it
    raise ConfigError(
        f"config field 'task.train_size': too few generated problems differ from the "
        f"{cfg.test_size} held-out ones (numbers up to {c.number_max}); lower train_size"
    )


def load_problems(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config field 'task.countdown.data_path': no file '{path}'")
    records = json.loads(path.read_text())
    for r in records[:1]:
        if not {"numbers", "target"} <= r.keys():
            raise ConfigError(
                f"config field 'task.countdown.data_path': '{path}' lacks numbers/target"
            )
    return records


class CountdownTask:
    """Countdown from the paper's JSON (first records train, last records test) or generated."""

    name = "countdown"

    def __init__(self, cfg: TaskConfig) -> None:
        c = cfg.countdown
        self.template = c.template
        self.partial = c.partial_credit
        self.graded = c.partial_credit_per_number
        self.near = c.partial_credit_closeness
        if c.data_path:
            records = load_problems(c.data_path)
            if cfg.train_size + cfg.test_size > len(records):
                raise ConfigError(
                    f"config field 'task.train_size': train_size + test_size exceed the "
                    f"{len(records)} records of '{c.data_path}'"
                )
            train, test = records[: cfg.train_size], records[len(records) - cfg.test_size :]
        else:
            train, test = generated_split(cfg)
        self.train = [self.example(r) for r in train]
        self.test = [self.example(r) for r in test]
        # what other training data (pretraining) must leave out
        self.heldout_keys = {problem_key(r) for r in test}

    def example(self, record: dict) -> Example:
        numbers = [int(n) for n in record["numbers"]]
        prompt = self.template.format(
            numbers=" ".join(map(str, numbers)),
            target=record["target"],
            context=record.get("context", ""),
        )
        return Example(prompt, (numbers, float(record["target"]), record.get("solution") or ""))

    def score(self, completion: str, example: Example) -> float:
        numbers, target, _ = example.answer
        prefix = THINK_OPEN if example.prompt.endswith(THINK_OPEN) else ""
        return countdown_reward(
            completion, numbers, target, prefix, self.partial, self.graded, self.near
        )
