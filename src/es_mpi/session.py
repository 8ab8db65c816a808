"""What the CLI commands do: start, resume and replay a run, and summarise its log.

Input is checked on rank 0 and the verdict broadcast before any collective work, so bad
input ends every rank with the same one-line error and nothing overwritten (invariant 6).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .checkpoint import list_checkpoints, load_checkpoint, replace_dir
from .comm import Comm
from .config import Config, ConfigError, multiplier_for, parse_scale_multipliers
from .config_load import apply_resume_overrides, config_from_dict
from .engine import Engine
from .evaluate import Evaluator, HeldoutScore, heldout_score
from .modelio import check_model_dir, check_tokenizer, model_sha256, save_hf_dir
from .perturb import MasterWeights, per_tensor_std, weights_checksum
from .prompts import Prompter
from .runlog import LOG_NAME, LogData, ReplayMismatch, RunLog, RunLogError
from .strategy import Population
from .tasks import make_task
from .trainer import Trainer, apply_es_update


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
    engine = Engine.load(cfg, comm)
    engine.weights.scales = sigma_scales(cfg, engine.weights)
    log = RunLog(run_dir / LOG_NAME) if comm.is_main else None
    if log is not None:
        log.set_attrs(sigma_scales=json.dumps(engine.weights.scales))
        log.add_session({"command": "train", "start": 0, "ranks": comm.size, "time": time.time()})
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


def sigma_scales(
    cfg: Config, weights: MasterWeights, data: LogData | None = None
) -> dict[str, float]:
    """Per-tensor sigma/alpha multipliers: the ones logged when the run started, else derived
    from the base weights (deterministic; covers a crash before they were logged)."""
    if data is not None and "sigma_scales" in data.attrs:
        return json.loads(data.attrs["sigma_scales"])
    if cfg.es.sigma_scale == "per_tensor_std":
        scales = per_tensor_std(weights.master)
    else:
        scales = dict.fromkeys(weights.names, 1.0)
    multipliers = parse_scale_multipliers(cfg.es.scale_multipliers)
    for name in scales:  # the first matching pair applies
        scales[name] *= multiplier_for(name, multipliers)
    if cfg.es.perturb_only:
        pattern = re.compile(cfg.es.perturb_only)
        scales = {n: s if pattern.search(n) else 0.0 for n, s in scales.items()}
        if not any(scales.values()):
            raise ConfigError(
                f"config field 'es.perturb_only': no parameter name matches "
                f"'{cfg.es.perturb_only}' (e.g. '{weights.names[0]}')"
            )
    return scales


def replay_rows(
    weights: MasterWeights, cfg: Config, data: LogData, start: int, stop: int, verify_each: bool
) -> None:
    """Apply logged iterations start..stop-1 to `weights` without any evaluation."""
    cols = data.columns
    for it in range(start, stop):
        population = Population(cols["member_seeds"][it], cols["member_signs"][it])
        apply_es_update(weights, population, cols["rewards"][it], cfg.es, it)
        if (verify_each or it == stop - 1) and weights.checksum() != data.checksums[it]:
            raise ReplayMismatch(
                f"replay: checksum mismatch at iteration {it} (0-based, the log's 'iteration') "
                "(the log's seeds or rewards were altered, or the base model differs)"
            )


def restore_master(
    weights: MasterWeights, cfg: Config, data: LogData, run_dir: Path, upto: int | None = None
) -> int:
    """Bring the master weights to iteration `upto` (default: the end of the log): the newest
    checksum-valid checkpoint at or before it, then replay. Returns the checkpoint used."""
    done = data.iterations_done if upto is None else upto
    start = 0
    for k, path in reversed(list_checkpoints(run_dir)):
        if 0 < k <= done:
            state = load_checkpoint(path)
            if weights_checksum(state) == data.checksums[k - 1]:  # else damaged or foreign
                weights.load_state_dict(state)
                start = k
                break
    if done > start:
        replay_rows(weights, cfg, data, start, done, verify_each=False)
    return start


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
    engine = Engine.load(cfg, comm, model_path=model_dir)
    engine.weights.scales = sigma_scales(cfg, engine.weights, data)
    from_checkpoint = restore_master(engine.weights, cfg, data, run_dir)
    log = RunLog(run_dir / LOG_NAME) if comm.is_main else None
    if log is not None:
        log.set_attrs(config_yaml=cfg.to_yaml())
        log.add_session(
            {
                "command": "resume",
                "start": data.iterations_done,
                "ranks": comm.size,
                "from_checkpoint": from_checkpoint,
                "time": time.time(),
            }
        )
        print(
            f"[es-mpi] resuming at iteration {data.iterations_done} (checkpoint "
            f"{from_checkpoint}, replayed {data.iterations_done - from_checkpoint})",
            flush=True,
        )
    Trainer(engine, make_task(cfg.task), run_dir, log).run(start=data.iterations_done)
    return engine.weights


def replay_run(run_dir: Path, out: Path, comm: Comm) -> int:
    """Rebuild the weights from the base model and the log alone; check every checksum."""
    cfg, data, model_dir = checked_on_main(comm, lambda: read_run(run_dir, truncate=False))
    engine = Engine.load(cfg, comm, model_path=model_dir)
    engine.weights.scales = sigma_scales(cfg, engine.weights, data)
    replay_rows(engine.weights, cfg, data, 0, data.iterations_done, verify_each=True)
    if comm.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        save_hf_dir(engine.model, engine.tokenizer, engine.weights.state_dict(), tmp)
        replace_dir(tmp, out)
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
    engine = Engine.load(cfg, Comm.serial(), model_path=model_dir)
    engine.weights.scales = sigma_scales(cfg, engine.weights, data)
    start = restore_master(engine.weights, cfg, data, run_dir, upto=iteration)
    if iteration and engine.weights.checksum() != data.checksums[iteration - 1]:
        raise ReplayMismatch(f"export: checksum mismatch at iteration {iteration - 1}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_hf_dir(engine.model, engine.tokenizer, engine.weights.state_dict(), tmp, dtype)
    replace_dir(tmp, out)
    return start


def run_summary(run_dir: Path) -> dict[str, Any]:
    """What `es-mpi inspect` prints: config highlights, base model, progress, best held-out
    score, time per iteration, sessions, and the integrity of the log and checkpoints."""
    log = RunLog(run_dir / LOG_NAME)
    data = log.read()
    cfg = config_from_dict(yaml.safe_load(data.attrs["config_yaml"]))
    cols, held = data.columns, data.heldout
    done = data.iterations_done
    es = cfg.es
    best = int(np.argmax(held["heldout_accuracy"])) if len(held["heldout_accuracy"]) else None
    sessions = json.loads(data.attrs.get("sessions", "[]"))
    checkpoints = list_checkpoints(run_dir)
    return {
        "run_dir": str(run_dir),
        "task": cfg.task.name,
        "es": f"{es.mode} N={es.population} sigma={es.sigma:g} alpha={es.alpha:g} "
        f"{es.shaping} sigma_scale={es.sigma_scale} antithetic={es.antithetic}"
        + (
            f" rank={es.rank} members_per_batch={es.members_per_batch}"
            if es.mode == "lowrank"
            else ""
        )
        + (f" top_pairs={es.top_pairs}" if es.shaping == "top_pairs" else "")
        + "".join(
            f" {name} {schedule} to {final:g}x over {over} its"
            for name, schedule, final, over in (
                ("alpha", es.alpha_schedule, es.alpha_final, es.alpha_decay_iterations),
                ("sigma", es.sigma_schedule, es.sigma_final, es.sigma_decay_iterations),
            )
            if schedule != "constant"
        ),
        "prompts_per_member": cfg.task.prompts_per_member,
        "model_path": data.attrs["model_path"],
        "model_sha256": data.attrs["model_sha256"],
        "iterations_done": done,
        "iterations_planned": es.iterations,
        "sessions": [f"{x['command']} from {x['start']} on {x['ranks']} rank(s)" for x in sessions],
        "reward_mean_first": float(cols["reward_mean"][0]) if done else None,
        "reward_mean_last": float(cols["reward_mean"][-1]) if done else None,
        "heldout_first": _heldout_at(held, 0),
        "heldout_last": _heldout_at(held, -1),
        "heldout_best": _heldout_at(held, best) if best is not None else None,
        "seconds_per_iteration_median": float(np.median(cols["time_iteration"])) if done else None,
        "training_minutes": float(np.sum(cols["time_iteration"]) / 60) if done else 0.0,
        "last_checksum": data.checksums[-1] if done else None,
        "log_integrity": log.integrity(),
        "checkpoints": {k: _checkpoint_state(path, data, k) for k, path in checkpoints},
        "final_present": (run_dir / "final" / "model.safetensors").is_file(),
    }


def _heldout_at(held: dict[str, np.ndarray], index: int) -> str | None:
    if not len(held["heldout_accuracy"]):
        return None
    return (
        f"{100 * held['heldout_accuracy'][index]:.1f}% (reward "
        f"{held['heldout_reward'][index]:.4f}) after {int(held['heldout_iteration'][index])} it"
    )


def _checkpoint_state(path: Path, data: LogData, k: int) -> str:
    if k > data.iterations_done:
        return "beyond the log"
    try:
        ok = weights_checksum(load_checkpoint(path)) == data.checksums[k - 1]
    except Exception as exc:  # noqa: BLE001 - report any unreadable file, keep going
        return f"unreadable ({type(exc).__name__})"
    return "checksum ok" if ok else "CHECKSUM MISMATCH"
