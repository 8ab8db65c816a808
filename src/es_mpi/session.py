"""What the CLI commands do: start, resume and replay a run, and summarise its log.

Input is checked on rank 0 and the verdict broadcast before any collective work, so bad
input ends every rank with the same one-line error and nothing overwritten (invariant 6).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .comm import Comm
from .config import Config, ConfigError
from .config_load import apply_resume_overrides, config_from_dict
from .engine import Engine, device_description, software_versions
from .errors import ReplayMismatch, RunLogError
from .evaluate import Evaluator, HeldoutScore, heldout_score
from .modelio import check_model_dir, check_tokenizer, model_sha256
from .perturb import MasterWeights
from .prompts import Prompter
from .runlog import LOG_NAME, LogData, RunLog
from .tasks import make_task
from .trainer import Trainer
from .update import load_replica, replay_rows, restore_master


def checked_on_main(comm: Comm, check: Callable[[], Any]) -> Any:
    """Run `check` on rank 0 and share its result, or its ConfigError, with every rank."""
    outcome: tuple[str | None, Any] = (None, None)
    if comm.is_main:
        try:
            outcome = (None, check())
        except (ConfigError, RunLogError) as exc:
            outcome = (str(exc), None)
    error, result = comm.bcast(outcome)
    if error is not None:
        raise ConfigError(error)
    return result


def check_optional_packages(cfg: Config) -> None:
    if cfg.runtime.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "config field 'runtime.tensorboard': the tensorboard package is not installed "
                "(pip install tensorboard), or run without it"
            ) from exc


def check_inputs(cfg: Config) -> Path:
    """Every file the config points to (model, tokenizer, chat template, task data), checked
    before any rank loads anything: a bad one is a ConfigError naming the field and file."""
    model_dir = check_model_dir(cfg.model.path)
    tokenizer = check_tokenizer(model_dir)
    Prompter(tokenizer, cfg.task.chat, str(model_dir))
    make_task(cfg.task)  # a bad task name or data file fails here
    return model_dir


def session_devices(engine: Engine, comm: Comm) -> dict:
    """Collective: every rank's device (description -> rank count) and rank 0's software,
    for the session record (a run may move between CPUs and GPU models; docs/design.md)."""
    described = comm.gather(device_description(engine.device))
    if described is None:
        return {}
    counts: dict[str, int] = {}
    for text in described:
        counts[text] = counts.get(text, 0) + 1
    return {"devices": counts, "software": software_versions()}


def start_run(cfg: Config, run_dir: Path, overwrite: bool, comm: Comm) -> MasterWeights:
    def prepare() -> None:
        check_optional_packages(cfg)
        model_dir = check_inputs(cfg)  # before the run dir is touched
        if run_dir.exists() and any(run_dir.iterdir()):
            if not overwrite:
                raise ConfigError(
                    f"--run-dir: '{run_dir}' already exists (pass --overwrite to replace it)"
                )
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        RunLog.create(
            run_dir / LOG_NAME,
            cfg.to_yaml(),
            str(model_dir.resolve()),
            model_sha256(model_dir),
            cfg.es.population,
        )

    checked_on_main(comm, prepare)
    engine = load_replica(cfg, comm)
    log = RunLog(run_dir / LOG_NAME) if comm.is_main else None
    devices = session_devices(engine, comm)
    if log is not None:
        log.set_attrs(sigma_scales=json.dumps(engine.weights.scales))
        log.add_session(
            {
                "command": "train",
                "start": 0,
                "ranks": comm.size,
                "time": time.time(),
                "load_seconds": engine.load_seconds,
                **devices,
            }
        )
    Trainer(engine, make_task(cfg.task), run_dir, log).run(start=0)
    return engine.weights


def evaluate_model(cfg: Config, comm: Comm) -> HeldoutScore:
    """Held-out score of the model at cfg.model.path on cfg.task (no training)."""

    checked_on_main(comm, lambda: check_inputs(cfg))
    task = make_task(cfg.task)
    engine = Engine.load(cfg, comm)
    evaluator = Evaluator.for_config(engine.model, engine.tokenizer, task, cfg, engine.model_path)
    return heldout_score(evaluator, task.test, comm, cfg.task.eval_batch)


def read_run(run_dir: Path, truncate: bool) -> tuple[Config, LogData, Path]:
    """Config, committed log rows and a verified base-model path of an existing run."""
    log = RunLog(run_dir / LOG_NAME)
    if not log.path.is_file():
        raise ConfigError(f"--run-dir: no run log at '{log.path}'")
    if truncate:
        log.truncate_to_committed()
    data = log.read()
    cfg = config_from_dict(yaml.safe_load(data.attrs["config_yaml"]))
    model_dir = Path(cfg.model.path)
    if not model_dir.is_dir():
        model_dir = Path(data.attrs["model_path"])
    check_model_dir(model_dir)
    if model_sha256(model_dir) != data.attrs["model_sha256"]:
        raise ConfigError(
            f"config field 'model.path': '{model_dir}' is not the base model of this "
            "run (sha256 of its weights differs from the log)"
        )
    return cfg, data, model_dir


def resume_run(
    run_dir: Path, iterations: int | None, comm: Comm, overrides: list[str] | None = None
) -> MasterWeights:
    def prepare() -> tuple[Config, LogData, str]:
        cfg, data, model_dir = read_run(run_dir, truncate=True)
        cfg = apply_resume_overrides(cfg, overrides or [])
        check_optional_packages(cfg)
        if iterations is not None:
            if iterations < data.iterations_done:
                raise ConfigError(
                    f"--iterations: {iterations} is below the {data.iterations_done} "
                    "iterations already done"
                )
            cfg.es.iterations = iterations
        return cfg, data, str(model_dir)

    cfg, data, model_dir = checked_on_main(comm, prepare)
    engine = load_replica(cfg, comm, model_dir, data)
    from_checkpoint = restore_master(engine.weights, cfg, data, run_dir)
    log = RunLog(run_dir / LOG_NAME) if comm.is_main else None
    devices = session_devices(engine, comm)
    if log is not None:
        log.set_attrs(config_yaml=cfg.to_yaml())
        log.add_session(
            {
                "command": "resume",
                "start": data.iterations_done,
                "ranks": comm.size,
                "from_checkpoint": from_checkpoint,
                "time": time.time(),
                "load_seconds": engine.load_seconds,
                **devices,
            }
        )
        print(
            f"[es-mpi] resuming at iteration {data.iterations_done} (checkpoint "
            f"{from_checkpoint}, replayed {data.iterations_done - from_checkpoint})",
            flush=True,
        )
    Trainer(engine, make_task(cfg.task), run_dir, log).run(start=data.iterations_done)
    return engine.weights


def replay_run(run_dir: Path, out: Path, comm: Comm, device: str | None = None) -> int:
    """Rebuild the weights from the base model and the log alone; check every checksum.
    `device` replaces the run's runtime.device (a counter-noise log replays on any)."""
    cfg, data, model_dir = checked_on_main(comm, lambda: read_run(run_dir, truncate=False))
    if device:
        cfg.runtime.device = device
    engine = load_replica(cfg, comm, model_dir, data)
    replay_rows(engine.weights, cfg, data, 0, data.iterations_done, verify_each=True)
    if comm.is_main:
        engine.save_master(out)
        print(
            f"[es-mpi] replayed {data.iterations_done} iterations, every checksum matches; "
            f"weights in {out}",
            flush=True,
        )
    return data.iterations_done


def export_run(run_dir: Path, iteration: int, out: Path, dtype: str) -> int:
    """Weights after `iteration` iterations (checkpoint + replay, checksum-verified) as an
    HF directory in float32 or bfloat16. Returns the checkpoint the replay started from."""
    cfg, data, model_dir = read_run(run_dir, truncate=False)
    if not 0 <= iteration <= data.iterations_done:
        raise ConfigError(
            f"--iteration: {iteration} is outside 0..{data.iterations_done} (iterations logged)"
        )
    engine = load_replica(cfg, Comm.serial(), model_dir, data)
    start = restore_master(engine.weights, cfg, data, run_dir, upto=iteration)
    if iteration and engine.weights.checksum() != data.checksums[iteration - 1]:
        raise ReplayMismatch(f"export: checksum mismatch at iteration {iteration - 1}")
    engine.save_master(out, dtype)
    return start
