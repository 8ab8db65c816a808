"""Low-rank benchmark (`make bench`): ratios measured in one process on this machine.

1. Population throughput: M members x P prompts x T generated tokens per second with the
   low-rank hooks active, divided by plain batched greedy inference of the unperturbed model
   on the same M*P rows and T tokens (same process, same batch, every row forced to T
   tokens so both sides decode exactly the same number of tokens). r = 1, 4, 16; with
   transformers' generate, and (Llama / Qwen2 models) with the fast decoder adding the
   members' deltas itself.
2. Low-rank vs full-parameter ES: iterations per second of Trainer.step at the same N and
   prompt batch (low rank with all N members in one batch), one rank.
3. Evaluation dtypes (full-parameter mode): iteration time of bfloat16 / int8 evaluation
   copies against float32 and the change of the unperturbed model's held-out reward.
Runs alternate between the compared settings; min and median over the repeats are printed.
Usage: python benchmarks/lowrank.py [--config configs/countdown-plain.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from es_mpi.comm import Comm  # noqa: E402
from es_mpi.config_load import load_config  # noqa: E402
from es_mpi.decode import fast_decode_problem, greedy_decode  # noqa: E402
from es_mpi.engine import Engine  # noqa: E402
from es_mpi.evaluate import Evaluator, heldout_score  # noqa: E402
from es_mpi.lowrank import PopulationHooks  # noqa: E402
from es_mpi.strategy import member_population  # noqa: E402
from es_mpi.tasks import make_task  # noqa: E402
from es_mpi.trainer import Trainer  # noqa: E402
from es_mpi.update import sigma_scales  # noqa: E402


def fmt(values: list[float], unit: str = "") -> str:
    return f"min {min(values):.3f}{unit}, median {statistics.median(values):.3f}{unit}"


def engine_for(config: Path, overrides: list[str]) -> tuple[Engine, object]:
    cfg = load_config(config, overrides)
    engine = Engine.load(cfg, Comm.serial())
    engine.weights.scales = sigma_scales(cfg, engine.weights)
    return engine, make_task(cfg.task)


def timed_generate(model, batch, generation: GenerationConfig, hooks=None) -> float:
    """Seconds of one greedy generation of `batch`: transformers' generate (hooks=None: the
    model's own hooks, if any, are active) or, given the hooks, the fast decoder adding
    their deltas; every row decodes max_new_tokens tokens."""
    t0 = time.perf_counter()
    with torch.no_grad():
        if hooks is None:
            model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                generation_config=generation,
            )
        else:  # an end id no token has: every row runs to the end
            greedy_decode(
                model,
                batch.input_ids,
                batch.attention_mask,
                generation.max_new_tokens,
                -1,
                generation.pad_token_id,
                population=hooks,
            )
    return time.perf_counter() - t0


def throughput(config: Path, members: int, repeats: int, ranks: list[int]) -> None:
    engine, task = engine_for(config, ["es.mode=lowrank"])
    cfg = engine.cfg
    evaluator = Evaluator(engine.model, engine.tokenizer, task, cfg.task.max_new_tokens)
    prompts = cfg.task.prompts_per_member
    batch = evaluator.encode(task.train[:prompts]).repeat(members)
    tokens = cfg.task.max_new_tokens
    forced = GenerationConfig(  # every row decodes exactly `tokens` tokens on both sides
        do_sample=False,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        eos_token_id=engine.tokenizer.eos_token_id,
        pad_token_id=engine.tokenizer.pad_token_id,
    )
    population = member_population(0, 0, members, antithetic=False)
    print(
        f"1. population throughput: {members} members x {prompts} prompts x {tokens} tokens "
        f"= {members * prompts * tokens:,} tokens per pass, 1 thread"
    )
    fast = fast_decode_problem(engine.model) is None
    for rank in ranks:
        engine.weights.use_lowrank(rank, perturb_vectors=False)
        hooks = PopulationHooks(engine.model, engine.weights.lowrank)
        ratios: dict[str, list[float]] = {"generate": [], "fast decoder": []}
        plain_rates: dict[str, list[float]] = {"generate": [], "fast decoder": []}
        for _ in range(repeats):
            for decoder in ratios if fast else ["generate"]:
                with_hooks = hooks if decoder == "fast decoder" else None
                t_plain = timed_generate(engine.model, batch, forced, with_hooks)
                hooks.activate(
                    population.seeds.tolist(),
                    population.signs.tolist(),
                    cfg.es.sigma,
                    engine.weights.scales,
                    torch.float32,
                )
                t_lowrank = timed_generate(engine.model, batch, forced, with_hooks)
                hooks.deactivate()
                ratios[decoder].append(t_plain / t_lowrank)
                plain_rates[decoder].append(members * prompts * tokens / t_plain)
        hooks.remove()
        for decoder, values in ratios.items():
            if values:
                print(
                    f"   r={rank:<2} {decoder}: low-rank / plain tokens per second: "
                    f"{fmt(values)} (plain {statistics.median(plain_rates[decoder]):,.0f} "
                    "tokens/s)",
                    flush=True,
                )


def step_seconds(trainer: Trainer, iteration: int) -> float:
    t0 = time.perf_counter()
    trainer.step(iteration)
    return time.perf_counter() - t0


def full_vs_lowrank(config: Path, repeats: int, population: int) -> None:
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, extra in (
            ("full", []),
            ("lowrank", ["es.mode=lowrank", f"es.members_per_batch={population}"]),
        ):
            engine, task = engine_for(config, [f"es.population={population}", *extra])
            trainers[mode] = Trainer(engine, task, Path(tmp), None)
        times: dict[str, list[float]] = {"full": [], "lowrank": []}
        for it in range(repeats + 1):
            for mode, trainer in trainers.items():
                seconds = step_seconds(trainer, it)
                if it:  # the first iteration warms up
                    times[mode].append(seconds)
    ratios = [f / lr for f, lr in zip(times["full"], times["lowrank"], strict=True)]
    print(
        f"2. iterations per second, low rank (r=1, {population} members per batch) / full: "
        f"{fmt(ratios)} (s/it full {fmt(times['full'], ' s')}; "
        f"low rank {fmt(times['lowrank'], ' s')})",
        flush=True,
    )


def eval_dtypes(config: Path, repeats: int, dtypes: list[str]) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            engine, task = engine_for(config, [f"model.eval_dtype={dtype}"])
            trainer = Trainer(engine, task, Path(tmp), None)
            score = heldout_score(  # the unperturbed base model in this dtype
                trainer.evaluator, task.test, Comm.serial(), engine.cfg.task.eval_batch
            )
            step_seconds(trainer, 0)  # warm-up
            seconds = [step_seconds(trainer, 1 + k) for k in range(repeats)]
            results[dtype] = (seconds, score.reward, score.accuracy)
    base_seconds, base_reward, base_acc = results["float32"]
    print("3. evaluation copy dtype (full-parameter mode), against float32:")
    for dtype, (seconds, reward, acc) in results.items():
        ratios = [s / b for s, b in zip(seconds, base_seconds, strict=True)]
        print(
            f"   {dtype:<9} iteration time ratio {fmt(ratios)}; held-out reward {reward:.4f} "
            f"({reward - base_reward:+.4f}), accuracy {100 * acc:.1f}% "
            f"({100 * (acc - base_acc):+.1f} points)",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "countdown-plain.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--members", type=int, default=30)
    p.add_argument("--ranks", default="1,4,16")
    p.add_argument("--dtypes", default="float32,bfloat16,int8")
    args = p.parse_args()
    torch.set_num_threads(1)
    throughput(args.config, args.members, args.repeats, [int(r) for r in args.ranks.split(",")])
    full_vs_lowrank(args.config, args.repeats, args.members)
    eval_dtypes(args.config, args.repeats, args.dtypes.split(","))


if __name__ == "__main__":
    main()
