"""Decoder benchmark (`make bench`): runtime.decoder fast against hf, one process.

For each (decoder, evaluation dtype): the time of Trainer.step (one rank, the config's
population and prompt batch), as a ratio to hf / float32 measured in the same repeat (the
settings alternate, so machine noise hits all alike); whether the members' rewards equal
hf / float32's in the same iterations; the held-out score of the unperturbed base.
Usage: python benchmarks/decode.py [--config configs/default.yaml] [--repeats 3]
       [--set key=value ...] (e.g. model.path=models/llama3-tiny-chat)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from es_mpi.comm import Comm  # noqa: E402
from es_mpi.config_load import load_config  # noqa: E402
from es_mpi.engine import Engine  # noqa: E402
from es_mpi.evaluate import heldout_score  # noqa: E402
from es_mpi.tasks import make_task  # noqa: E402
from es_mpi.trainer import Trainer  # noqa: E402
from es_mpi.update import sigma_scales  # noqa: E402

SETTINGS = {
    "hf float32": ["runtime.decoder=hf", "model.eval_dtype=float32"],
    "fast float32": ["runtime.decoder=fast", "model.eval_dtype=float32"],
    "hf bfloat16": ["runtime.decoder=hf", "model.eval_dtype=bfloat16"],
    "fast bfloat16": ["runtime.decoder=fast", "model.eval_dtype=bfloat16"],
}


def fmt(values: list[float]) -> str:
    return f"min {min(values):.2f}, median {statistics.median(values):.2f}"


def trainer_for(config: Path, overrides: list[str], tmp: Path) -> Trainer:
    cfg = load_config(config, overrides)
    engine = Engine.load(cfg, Comm.serial())
    engine.weights.scales = sigma_scales(cfg, engine.weights)
    return Trainer(engine, make_task(cfg.task), tmp, None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            name: trainer_for(args.config, args.set + o, Path(tmp)) for name, o in SETTINGS.items()
        }
        base = {  # the unperturbed base model under each setting, before any update
            name: heldout_score(t.evaluator, t.task.test, Comm.serial(), t.cfg.task.eval_batch)
            for name, t in trainers.items()
        }
        seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
        rewards: dict[str, list[np.ndarray]] = {name: [] for name in SETTINGS}
        for it in range(args.repeats + 1):  # iteration 0 warms up
            for name, trainer in trainers.items():
                t0 = time.perf_counter()
                record = trainer.step(it)
                if it:
                    seconds[name].append(time.perf_counter() - t0)
                rewards[name].append(record.rewards)
        reference = "hf float32"
        cfg = trainers[reference].cfg
        print(
            f"decoders ({args.config.name} {' '.join(args.set)}: N={cfg.es.population}, "
            f"{cfg.task.prompts_per_member} prompts, 1 rank, {args.repeats} iterations after "
            f"a warm-up), step time as a ratio to {reference}:"
        )
        for name in trainers:
            ratios = [s / b for s, b in zip(seconds[name], seconds[reference], strict=True)]
            same = sum(
                np.array_equal(a, b) for a, b in zip(rewards[name], rewards[reference], strict=True)
            )
            score = base[name]
            print(
                f"  {name:<14} time {fmt(ratios)} (median {statistics.median(seconds[name]):.2f} "
                f"s); rewards equal to {reference} in {same}/{len(rewards[name])} iterations; "
                f"base held-out {100 * score.accuracy:.1f}% reward {score.reward:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
