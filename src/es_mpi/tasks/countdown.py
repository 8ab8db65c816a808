"""Countdown (Qiu et al. 2025): combine the given numbers into an expression equal to the target.

Reward as in the paper: 0.1 * format + answer. Format is 1.0 for
`<think>...</think>\\n<answer>...</answer>`, else 0.1 for a think block plus 0.5 for an answer
block. Answer is 1.0 when the last `<answer>` uses exactly the given numbers (each once) and
evaluates to the target within 1e-5, by the safe evaluator (never eval()).

Only the completion is scored (docs/design.md, defect 5). A prompt that ends with the opening
`<think>` (as the paper's does, or a chat prompt whose task.chat.assistant_prefix does) has that
tag counted as the completion's first token, since the model cannot write it itself; nothing
else of the prompt is seen by the scorer. Completions of any length are scored: the safety
limits sit on the answer expression (safe_arith), and every check here is linear in the text.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..config import ConfigError, TaskConfig
from .base import Example, read_json_records
from .safe_arith import evaluate

THINK_OPEN = "<think>"
# The completion the shipped tiny model is pretrained to write after "{numbers}={target}<think>".
TINY_ANSWER_FORMAT = "</think>\n<answer>{solution}</answer>"
# The paper's prompt (its records' `context`, word for word): system part, user part with the
# numbers printed as numpy prints an integer array, and the assistant's opening.
PAPER_SYSTEM = (
    "You are a helpful assistant. You first think about the reasoning process in your mind "
    "and then provide the user with the answer."
)
PAPER_USER = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work "
    "in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
    "example <answer> (1 + 2) / 3 </answer>."
)
PAPER_ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>"


def paper_numbers(numbers: list[int]) -> str:
    """[44 19 35], right-aligned to the widest number as numpy prints it: '[ 2 54 17]'."""
    width = max((len(str(n)) for n in numbers), default=0)
    return "[" + " ".join(str(n).rjust(width) for n in numbers) + "]"


def full_format(text: str) -> bool:
    """text is '<think>' ... '</think>\n<answer>' ... '</answer>' (the paper's regex
    ^<think>.*?</think>\n<answer>.*?</answer>$ with DOTALL), decided in linear time."""
    middle = "</think>\n<answer>"
    text = text[:-1] if text.endswith("\n") else text  # the regex's $ allows one final newline
    if not (text.startswith("<think>") and text.endswith("</answer>")):
        return False
    at = text.find(middle, len("<think>"))
    return at != -1 and at + len(middle) <= len(text) - len("</answer>")


def last_answer(text: str) -> str | None:
    """The last match of the paper's <answer>(.*?)</answer> (non-overlapping, left to right,
    as re.findall), found with str.find in one pass instead of a regex that rescans the tail
    for every unclosed <answer>."""
    found, pos = None, 0
    while (start := text.find("<answer>", pos)) != -1:
        end = text.find("</answer>", start + len("<answer>"))
        if end == -1:
            break
        found, pos = text[start + len("<answer>") : end], end + len("</answer>")
    return found


def format_score(text: str) -> float:
    if full_format(text):
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
    answer = last_answer(text)
    if answer is None:
        return 0.0
    result = evaluate(answer)
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
    """0.1 * format + answer on prefix + completion (prefix: an opening tag ending the prompt)."""
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


def _record_problem(record: object) -> str | None:
    """What is wrong with one record (None: usable)."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object"
    if not {"numbers", "target"} <= record.keys():
        return "lacks 'numbers' or 'target'"
    numbers = record["numbers"]
    if (
        not isinstance(numbers, list)
        or not numbers
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)
    ):
        return "has 'numbers' that are not a non-empty list of integers"
    try:
        float(record["target"])
    except (TypeError, ValueError):
        return f"has a 'target' that is not a number ({record['target']!r})"
    if "context" in record and not isinstance(record["context"], str):
        return "has a 'context' that is not a string"
    return None


def load_problems(path: str | Path) -> list[dict]:
    """Records in the paper's format; any file problem is a ConfigError naming the field,
    the file and (for a bad record) its index."""
    records = read_json_records(path, "task.countdown.data_path")
    for i, record in enumerate(records):
        if problem := _record_problem(record):
            raise ConfigError(
                f"config field 'task.countdown.data_path': '{path}' record {i} {problem}"
            )
    return records


class CountdownTask:
    """Countdown from the paper's JSON (first records train, last records test) or generated."""

    name = "countdown"

    def __init__(self, cfg: TaskConfig) -> None:
        c = cfg.countdown
        self.template = c.template
        # what the model's prompt ends with: task.chat.assistant_prefix for a chat prompt,
        # the example's own prompt for a raw one (None)
        self.chat_prefix = cfg.chat.assistant_prefix if cfg.chat.enabled else None
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
        target = str(record["target"])
        if self.template == "paper":
            user = PAPER_USER.format(numbers=paper_numbers(numbers), target=target)
            prompt = (
                user
                if self.chat_prefix is not None
                else PAPER_SYSTEM + user + PAPER_ASSISTANT_PREFIX
            )
        else:
            prompt = self.template.format(
                numbers=" ".join(map(str, numbers)), target=target, context=record.get("context")
            )
        return Example(prompt, (numbers, float(record["target"]), record.get("solution") or ""))

    def score(self, completion: str, example: Example) -> float:
        numbers, target, _ = example.answer
        prompt_end = example.prompt if self.chat_prefix is None else self.chat_prefix
        prefix = THINK_OPEN if prompt_end.endswith(THINK_OPEN) else ""
        return countdown_reward(
            completion, numbers, target, prefix, self.partial, self.graded, self.near
        )
