"""The GRPO baseline (`es-mpi grpo`): TRL's GRPOTrainer on the same model, task and reward.

It trains the base model at `model.path` with the task object ES uses: the same training
problems, rendered into the same prompt text (raw or chat template), the task's own `score`
on the completion as the reward, and the same greedy held-out evaluation as `es-mpi eval`,
scored at fixed seconds of training time (held-out time is not counted). Settings come from
the config's `grpo` section. TRL is an optional dependency (`make install-rl`).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .comm import Comm
from .config import Config, ConfigError
from .evaluate import Evaluator, heldout_score
from .modelio import load_model, load_tokenizer
from .tasks import Task, make_task, reports_kl


@dataclass
class Curve:
    """Held-out scores of one GRPO run at marks of training time, with the samples spent."""

    points: list[dict] = field(default_factory=list)
    completions: int = 0  # sampled completions so far
    tokens: int = 0  # their generated tokens

    def add(self, seconds: float, step: int, score) -> None:
        self.points.append(
            {
                "seconds": seconds,
                "step": step,
                "completions": self.completions,
                "tokens": self.tokens,
                "accuracy": score.accuracy,
                "reward": score.reward,
                "kl": score.kl,
            }
        )


def _trl():
    try:
        import datasets
        import trl
    except ImportError as exc:
        raise ConfigError(
            "es-mpi grpo needs TRL: make install-rl (pip install -r requirements-rl.txt)"
        ) from exc
    return trl, datasets


def reward_function(task: Task, curve: Curve):
    """TRL reward: the task's score of each completion against its training example (the
    dataset's `example` column); counts the samples spent."""

    def reward(prompts, completions, example, completion_ids=None, **kwargs) -> list[float]:
        curve.completions += len(completions)
        curve.tokens += sum(len(ids) for ids in completion_ids or [])
        return [task.score(c, task.train[i]) for c, i in zip(completions, example, strict=True)]

    return reward


def train_grpo(cfg: Config, out: Path, minutes: float, eval_seconds: float) -> Curve:
    """GRPO for `minutes` of training time; held-out every `eval_seconds` and at the end.
    Writes out/grpo.json and returns the curve."""
    trl, datasets = _trl()
    from transformers import TrainerCallback

    # TRL calls transformers' soon-renamed gradient_checkpointing API: not ours to fix
    warnings.filterwarnings("ignore", category=FutureWarning)

    g = cfg.grpo
    torch.set_num_threads(g.threads)
    task = make_task(cfg.task)
    tokenizer = load_tokenizer(cfg.model.path)
    model = load_model(cfg.model.path, "float32", torch.device("cpu"))
    evaluator = Evaluator.for_config(model, tokenizer, task, cfg, cfg.model.path)
    base = copy.deepcopy(model) if reports_kl(task) else None
    prompts = [evaluator.prompter.render(e) for e in task.train]
    dataset = datasets.Dataset.from_dict({"prompt": prompts, "example": list(range(len(prompts)))})
    curve = Curve()

    def score():
        model.eval()
        result = heldout_score(evaluator, task.test, Comm.serial(), cfg.task.eval_batch, base)
        model.train()
        return result

    class HeldoutClock(TrainerCallback):
        """Held-out scores at marks of training time; stops at the budget."""

        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.paused = 0.0  # seconds spent on held-out evaluation
            self.next_mark = eval_seconds
            self.last = 0.0  # training seconds at the previous step's end

        def on_step_end(self, args, state, control, **kwargs):
            trained = time.perf_counter() - self.start - self.paused
            # stop when the next step, as long as this one, would end past the budget (as
            # ES's time limit does), so the last score is within the budget
            done = trained + (trained - self.last) > 60 * minutes
            self.last = trained
            if trained >= self.next_mark or done:
                t0 = time.perf_counter()
                curve.add(trained, state.global_step, score())
                self.paused += time.perf_counter() - t0
                self.next_mark = (trained // eval_seconds + 1) * eval_seconds
            control.should_training_stop = done
            return control

    curve.add(0.0, 0, score())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = trl.GRPOConfig(
        output_dir=str(out / "trl"),
        use_cpu=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        num_generations=g.num_generations,
        per_device_train_batch_size=g.prompts_per_step * g.num_generations,
        learning_rate=g.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        temperature=g.temperature,
        beta=g.beta,
        max_completion_length=g.max_completion_length or cfg.task.max_new_tokens,
        max_steps=10**9,  # the clock stops it
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=False,
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward_function(task, curve),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[HeldoutClock()],
    )
    trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    moved = sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in model.named_parameters())
    size = sum(float(t.pow(2).sum()) for t in start.values())
    record = {
        "method": "grpo",
        "config": cfg.to_dict(),
        "update_norm_ratio": (moved / size) ** 0.5,  # |theta_end - theta_0| / |theta_0|
        "points": curve.points,
    }
    (out / "grpo.json").write_text(json.dumps(record, indent=1))
    return curve
