"""Greedy generation on a fixed prompt batch and the reward of one member."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig

from .config import ChatConfig, Config, ConfigError
from .decode import fast_decode_problem, greedy_decode
from .prompts import Prompter, end_token_ids
from .tasks import Example, Task


@dataclass
class PromptBatch:
    """A tokenised, left-padded batch; its shape is fixed by the config, never by the rank."""

    examples: list[Example]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def repeat(self, times: int) -> PromptBatch:
        """The batch `times` over, member-major: rows k*P .. k*P+P-1 belong to member k."""
        if times == 1:
            return self
        return PromptBatch(
            self.examples * times,
            self.input_ids.repeat(times, 1),
            self.attention_mask.repeat(times, 1),
        )


def resolve_decoder(requested: str, model, vector_hooks: bool = False, int8: bool = False) -> str:
    """runtime.decoder auto -> fast where es_mpi.decode supports the model and reads plain
    float weights (no int8 copy, no per-member 1-D tensors: es.lowrank_vectors full), else
    hf. A property of the model and the config only, so every rank and every resume decides
    alike."""
    if requested != "auto":
        return requested
    return "hf" if vector_hooks or int8 or fast_decode_problem(model) else "fast"


class Evaluator:
    """Scores the model as it currently is (its evaluation copy) on a prompt batch."""

    def __init__(
        self,
        model,
        tokenizer,
        task: Task,
        max_new_tokens: int,
        decoder: str = "hf",
        prompter: Prompter | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        """decoder: hf (`generate`) or fast (es_mpi.decode, its token step replayed from a
        CUDA graph on a GPU when `cuda_graphs`); prompter: raw prompts if None."""
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.prompter = prompter or Prompter(tokenizer, ChatConfig())
        self.device = next(model.parameters()).device
        if decoder == "fast" and (problem := fast_decode_problem(model)):
            raise ConfigError(f"config field 'runtime.decoder': {problem}; use hf or auto")
        self.fast = decoder == "fast"
        self.cuda_graphs = cuda_graphs
        # es.mode lowrank: the members' hooks (the trainer sets them); the fast decoder adds
        # their deltas itself, since it reads the weights without calling the modules
        self.population = None
        self.generated_tokens = 0  # running count (metrics: tokens per second)
        # Every end id of the model's generation_config.json and the tokenizer: instruct models
        # list several (Qwen2.5: <|im_end|>, <|endoftext|>), and a completion that runs past
        # the first fails a format check anchored at its end.
        self.end_ids = end_token_ids(tokenizer, getattr(model, "generation_config", None))
        self._end_ids = torch.tensor(self.end_ids, device=self.device)
        pad = tokenizer.pad_token_id
        self.generation = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.end_ids,
            pad_token_id=self.end_ids[0] if pad is None else pad,
        )

    @classmethod
    def for_config(cls, model, tokenizer, task: Task, cfg: Config, model_path: str = ""):
        """The evaluator a run's config asks for: its prompt format, length and decoder."""
        vector_hooks = cfg.es.mode == "lowrank" and cfg.es.lowrank_vectors == "full"
        decoder = resolve_decoder(
            cfg.runtime.decoder, model, vector_hooks, cfg.model.eval_dtype == "int8"
        )
        prompter = Prompter(tokenizer, cfg.task.chat, model_path or cfg.model.path)
        return cls(
            model,
            tokenizer,
            task,
            cfg.task.max_new_tokens,
            decoder,
            prompter,
            cfg.runtime.cuda_graphs,
        )

    def encode(self, examples: list[Example]) -> PromptBatch:
        enc = self.tokenizer(
            [self.prompter.render(e) for e in examples],
            return_tensors="pt",
            padding=True,
            add_special_tokens=self.prompter.add_special_tokens,
        )
        return PromptBatch(
            examples, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        )

    @torch.no_grad()
    def generate(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy completions: (prompt + new token ids, mask of new tokens up to the first end)."""
        if self.fast:
            out = greedy_decode(
                self.model,
                batch.input_ids,
                batch.attention_mask,
                self.generation.max_new_tokens,
                self._end_ids,
                self.generation.pad_token_id,
                self.cuda_graphs,
                population=self.population,
            )
        else:
            out = self.model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                generation_config=self.generation,
            )
        new = out[:, batch.input_ids.shape[1] :]
        is_end = torch.isin(new, self._end_ids)
        ended = is_end.long().cumsum(dim=1)
        # keep tokens before the first end token, and that end token itself
        keep = (ended == 0) | ((ended == 1) & is_end)
        self.generated_tokens += int(keep.sum())
        return out, keep

    def completions(self, batch: PromptBatch) -> list[str]:
        # Score the completion only: the prompt must never earn reward (docs/design.md, defect 5).
        out, keep = self.generate(batch)
        return self.decode(out[:, batch.input_ids.shape[1] :], keep)

    def decode(self, new_tokens: torch.Tensor, keep: torch.Tensor) -> list[str]:
        """The kept tokens as text, the end token cut (special tokens are not text)."""
        ends = set(self.end_ids)
        return [
            self.tokenizer.decode(
                [t for t in row[mask].tolist() if t not in ends], skip_special_tokens=True
            )
            for row, mask in zip(new_tokens, keep, strict=True)
        ]

    def rewards(self, batch: PromptBatch) -> np.ndarray:
        """Reward of every prompt of the batch under the current evaluation copy."""
        return self.score_texts(self.completions(batch), batch)

    def score_texts(self, texts: list[str], batch: PromptBatch) -> np.ndarray:
        return np.array(
            [self.task.score(t, e) for t, e in zip(texts, batch.examples, strict=True)],
            dtype=np.float64,
        )


@torch.no_grad()
def k3_kl_sum(
    model, base_model, out: torch.Tensor, prompt_mask: torch.Tensor, keep: torch.Tensor
) -> tuple[float, int]:
    """Schulman's k3 estimate of KL(model || base) over generated tokens: sum and count.

    k3 = r - 1 - log r with r = p_base(token) / p_model(token), on the model's own tokens.
    """
    mask = torch.cat([prompt_mask, keep.long()], dim=1)
    n_prompt = prompt_mask.shape[1]
    targets = out[:, n_prompt:]

    def token_logprobs(m) -> torch.Tensor:
        logits = m(input_ids=out, attention_mask=mask).logits[:, n_prompt - 1 : -1].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    log_r = token_logprobs(base_model) - token_logprobs(model)
    k3 = (torch.exp(log_r) - 1 - log_r)[keep]
    return float(k3.double().sum()), int(keep.sum())


@dataclass
class HeldoutScore:
    reward: float
    """Mean reward over the held-out split."""
    accuracy: float
    """Share of held-out prompts whose reward is at least 1 (a fully correct answer)."""
    kl: float = float("nan")
    """k3 estimate of KL(model || base) per generated token (NaN when not asked for)."""


def heldout_score(
    evaluator: Evaluator, examples: list[Example], comm, batch_size: int, base_model=None
) -> HeldoutScore:
    """Score the model as it is on every example, batches dealt to ranks, scalars allgathered.

    Batches are consecutive runs of `batch_size` examples whatever the rank count, so every
    prompt is decoded in the same batch shape (docs/design.md, invariant 1). With `base_model`,
    also the k3 KL of the model's completions from the base model.
    """
    if not examples:
        return HeldoutScore(float("nan"), float("nan"))
    n_batches = -(-len(examples) // batch_size)
    local = []
    for b in comm.my_members(n_batches):
        batch = evaluator.encode(examples[b * batch_size : (b + 1) * batch_size])
        out, keep = evaluator.generate(batch)
        texts = evaluator.decode(out[:, batch.input_ids.shape[1] :], keep)
        kl = (0.0, 0)
        if base_model is not None:
            kl = k3_kl_sum(evaluator.model, base_model, out, batch.attention_mask, keep)
        local.append((b, evaluator.score_texts(texts, batch).tolist(), kl))
    rewards = np.empty(len(examples))
    kl_by_batch = {}
    for part in comm.allgather(local):
        for b, values, kl_sum_count in part:
            rewards[b * batch_size : b * batch_size + len(values)] = values
            kl_by_batch[b] = kl_sum_count
    # summed in batch order, so the figure does not depend on the rank count either
    kl_sum = sum(kl_by_batch[b][0] for b in sorted(kl_by_batch))
    kl_tokens = sum(n for _, n in kl_by_batch.values())
    kl = kl_sum / kl_tokens if base_model is not None and kl_tokens else float("nan")
    return HeldoutScore(float(rewards.mean()), float((rewards >= 1.0).mean()), kl)
