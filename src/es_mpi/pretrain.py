"""Supervised pretraining of the shipped tiny base models on generated Countdown problems.

The base is the character-level Llama (family char) or a chat fixture (qwen2, llama3, gemma3:
BPE tokenizer, chat template); prompts are rendered as the config's task section says (raw, or
through the chat template), and each completion ends with the model's first end id.

Deterministic from its seed (fixed steps, threads and batch shapes). Stopped early on purpose:
the base should solve some problems but leave ES room to improve.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .comm import Comm
from .config import Config, multiplier_for, parse_scale_multipliers
from .config_load import load_config
from .engine import set_threads
from .evaluate import Evaluator, heldout_score
from .prompts import Prompter, end_token_ids
from .tasks.countdown import TINY_ANSWER_FORMAT, CountdownTask, generate_problems, problem_key
from .tiny_model import tiny_llama


@dataclass
class PretrainArgs:
    out: str
    steps: int = 250
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    threads: int = 2
    config: str = "configs/default.yaml"
    """Task settings (template, number ranges, held-out split) come from this config."""
    weight_noise: float = 0.0
    """Noise-robust training: each step's loss is taken at weights + N(0, (weight_noise x
    the tensor's std)^2), the gradient applied to the clean weights (0: plain training)."""
    tag_tokens: bool = False
    """Countdown's <think>/<answer> tags as single tokens (shorter completions, faster ES)."""
    noise_multipliers: str = ""
    """Per-tensor factors on weight_noise, as 'regex=factor,...' (es.scale_multipliers'
    syntax, first match applies): pretraining under the noise ES will apply."""
    family: str = "char"
    """char: the character-level Llama; qwen2, llama3, gemma3: a chat fixture
    (es_mpi.chat_fixtures) with its BPE tokenizer (tag_tokens does not apply)."""


def base_model(args: PretrainArgs):
    """The randomly initialised (model, tokenizer) pretraining starts from."""
    if args.family == "char":
        return tiny_llama(args.hidden, args.layers, args.heads, args.seed, args.tag_tokens)
    from .chat_fixtures import fixture

    return fixture(args.family, args.seed, args.hidden, args.layers, heads=args.heads)


# What a chat fixture writes after its end-of-turn token: the start of another turn, as a
# chat model that nobody stops goes on (so stopping on the wrong end id shows in the text).
AFTER_END_OF_TURN = "\nUsing the numbers"


def _batch_tensors(
    tokenizer,
    prompts: list[str],
    completions: list[str],
    end_id: int,
    special: bool = False,
    after_end: str = "",
):
    """Right-padded ids with labels on the completion, its end token and `after_end` only;
    `special`: the tokenizer adds its special tokens to the prompt (raw prompts; chat text
    has them)."""
    rows, labels = [], []
    tail = [end_id] + (
        tokenizer(after_end, add_special_tokens=False).input_ids if after_end else []
    )
    for prompt, completion in zip(prompts, completions, strict=True):
        p = tokenizer(prompt, add_special_tokens=special).input_ids
        c = tokenizer(completion, add_special_tokens=False).input_ids + tail
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, lab


@torch.no_grad()
def _perturb(
    model, scale: float, generator: torch.Generator, multipliers: list | None = None
) -> list[torch.Tensor]:
    """Add scaled Gaussian noise to every weight; returns the clean weights to restore.
    multipliers: parsed per-tensor factors (parse_scale_multipliers), parsed once per run."""
    if not scale:
        return []
    clean = []
    for name, p in model.named_parameters():
        clean.append(p.detach().clone())
        factor = multiplier_for(name, multipliers or [])
        p.add_(torch.randn(p.shape, generator=generator), alpha=scale * factor * float(p.std()))
    return clean


@torch.no_grad()
def _unperturb(model, clean: list[torch.Tensor]) -> None:
    """Restore the clean weights exactly ((w + e) - e is not always w in floating point)."""
    for p, weights in zip(model.parameters(), clean, strict=False):
        p.copy_(weights)


def pretrain(args: PretrainArgs) -> dict:
    # parsed before any work, so a bad value fails at once
    multipliers = parse_scale_multipliers(args.noise_multipliers, "pretrain --noise-multipliers")
    set_threads(args.threads)
    cfg: Config = load_config(args.config, ["task.name=countdown"])
    task = CountdownTask(cfg.task)
    c = cfg.task.countdown
    problems = [
        p
        for p in generate_problems(
            args.steps * args.batch * 2, args.seed + 1, (c.min_numbers, c.max_numbers), c.number_max
        )
        if problem_key(p) not in task.heldout_keys
    ][: args.steps * args.batch]
    model, tokenizer = base_model(args)
    prompter = Prompter(tokenizer, cfg.task.chat, f"pretrain --family {args.family}")
    end_id = end_token_ids(tokenizer, model.generation_config)[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * max(0.0, 1 - s / args.steps)
    )
    generator = torch.Generator().manual_seed(args.seed + 2)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        chunk = problems[step * args.batch : (step + 1) * args.batch]
        ids, mask, labels = _batch_tensors(
            tokenizer,
            [prompter.render(task.example(p)) for p in chunk],
            [TINY_ANSWER_FORMAT.format(solution=p["solution"]) for p in chunk],
            end_id,
            prompter.add_special_tokens,
            "" if args.family == "char" else AFTER_END_OF_TURN,
        )
        clean = _perturb(model, args.weight_noise, generator, multipliers)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        _unperturb(model, clean)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(
                f"[pretrain] step {step + 1}/{args.steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    model.eval()
    tokenizer.padding_side = "left"
    evaluator = Evaluator(model, tokenizer, task, cfg.task.max_new_tokens, "hf", prompter)
    score = heldout_score(evaluator, task.test, Comm.serial(), cfg.task.eval_batch)
    out = Path(args.out)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    record = {
        "args": asdict(args),
        "final_loss": loss.item(),
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_accuracy": score.accuracy,
        "heldout_reward": score.reward,
        "heldout_prompts": len(task.test),
    }
    (out / "pretrain.json").write_text(json.dumps(record, indent=2))
    print(
        f"[pretrain] held-out accuracy {100 * score.accuracy:.1f}% reward {score.reward:.4f} "
        f"on {len(task.test)} problems; model in {out}",
        flush=True,
    )
    return record
