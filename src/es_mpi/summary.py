"""`es-mpi inspect`: a run's settings, progress, held-out scores, speed and integrity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .checkpoint import list_checkpoints
from .config_load import config_from_dict
from .runlog import LOG_NAME, LogData, RunLog
from .tensorfile import file_fingerprint


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
        "log_kinds": f"noise {data.noise_kind}, fingerprint {data.fingerprint_kind}",
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
        ok = file_fingerprint(path, data.fingerprint_kind) == data.checksums[k - 1]
    except Exception as exc:  # noqa: BLE001 - report any unreadable file, keep going
        return f"unreadable ({type(exc).__name__})"
    return "checksum ok" if ok else "CHECKSUM MISMATCH"
