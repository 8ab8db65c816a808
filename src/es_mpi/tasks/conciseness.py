"""Conciseness (Qiu et al. 2025): reward = -|len(completion) - len(shortest correct answer)|.

Question/answer pairs come from a JSON list of {"question": ..., "answers": [...]}
(`task.conciseness.data_path`), or are generated from Countdown problems: the question is the
Countdown prompt and the answer the reference solution in the tiny model's answer format.
The fine-tuned model's KL divergence from the base model is reported at held-out evaluation.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, TaskConfig
from .base import Example, read_json_records
from .countdown import TINY_ANSWER_FORMAT, CountdownTask


def load_pairs(path: str | Path) -> list[tuple[str, list[str]]]:
    """(question, answers) pairs of a JSON list of {"question": str, "answers": [str, ...]};
    any problem is a ConfigError naming the field, the file and the record."""
    records = read_json_records(path, "task.conciseness.data_path")
    pairs = []
    for i, r in enumerate(records):
        ok = isinstance(r, dict) and isinstance(r.get("question"), str)
        answers = r.get("answers") if ok else None
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            raise ConfigError(
                f"config field 'task.conciseness.data_path': '{path}' record {i} is not "
                '{"question": "...", "answers": ["...", ...]}'
            )
        pairs.append((r["question"], list(answers)))
    return pairs


class ConcisenessTask:
    name = "conciseness"
    report_kl = True  # the trainer scores KL(model || base) on the held-out split

    def __init__(self, cfg: TaskConfig) -> None:
        path = cfg.conciseness.data_path
        if path:
            pairs = load_pairs(path)
        else:
            countdown = CountdownTask(cfg)
            source = countdown.train + countdown.test
            pairs = [(e.prompt, [TINY_ANSWER_FORMAT.format(solution=e.answer[2])]) for e in source]
        if cfg.train_size + cfg.test_size > len(pairs):
            raise ConfigError(
                "config field 'task.train_size': train_size + test_size exceed the "
                f"{len(pairs)} question/answer pairs"
            )
        examples = [Example(q, min(len(a) for a in answers)) for q, answers in pairs]
        self.train = examples[: cfg.train_size]
        self.test = examples[len(examples) - cfg.test_size :]

    def score(self, completion: str, example: Example) -> float:
        return -float(abs(len(completion) - example.answer))
