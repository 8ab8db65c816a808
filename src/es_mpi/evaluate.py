"""Greedy generation on a fixed prompt batch and the reward of one member."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig

from .tasks import Example, Task


@dataclass
class PromptBatch:
    """A tokenised, left-padded batch; its shape is fixed by the config, never by the rank."""

    examples: list[Example]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class Evaluator:
    """Scores the model as it currently is (its evaluation copy) on a prompt batch."""

    def __init__(self, model, tokenizer, task: Task, max_new_tokens: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.device = next(model.parameters()).device
        # eos/pad set deliberately: a model's own generation_config may lack or differ in them.
        self.generation = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    def encode(self, examples: list[Example]) -> PromptBatch:
        enc = self.tokenizer([e.prompt for e in examples], return_tensors="pt", padding=True)
        return PromptBatch(
            examples, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        )

    @torch.no_grad()
    def completions(self, batch: PromptBatch) -> list[str]:
        out = self.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            generation_config=self.generation,
        )
        # Score the completion only: the prompt must never earn reward (DESIGN.md, defect 5).
        new_tokens = out[:, batch.input_ids.shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        texts = []
        for row in new_tokens:
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def rewards(self, batch: PromptBatch) -> np.ndarray:
        """Reward of every prompt of the batch under the current evaluation copy."""
        texts = self.completions(batch)
        return np.array(
            [self.task.score(t, e) for t, e in zip(texts, batch.examples, strict=True)],
            dtype=np.float64,
        )


@dataclass
class HeldoutScore:
    reward: float
    """Mean reward over the held-out split."""
    accuracy: float
    """Share of held-out prompts whose reward is at least 1 (a fully correct answer)."""


def heldout_score(
    evaluator: Evaluator, examples: list[Example], comm, batch_size: int
) -> HeldoutScore:
    """Score the model as it is on every example, batches dealt to ranks, rewards allgathered.

    Batches are consecutive runs of `batch_size` examples whatever the rank count, so every
    prompt is decoded in the same batch shape (DESIGN.md, invariant 1).
    """
    if not examples:
        return HeldoutScore(float("nan"), float("nan"))
    n_batches = -(-len(examples) // batch_size)
    local = []
    for b in comm.my_members(n_batches):
        chunk = examples[b * batch_size : (b + 1) * batch_size]
        local.append((b, evaluator.rewards(evaluator.encode(chunk)).tolist()))
    rewards = np.empty(len(examples))
    for part in comm.allgather(local):
        for b, values in part:
            rewards[b * batch_size : b * batch_size + len(values)] = values
    return HeldoutScore(float(rewards.mean()), float((rewards >= 1.0).mean()))
