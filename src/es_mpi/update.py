"""How the master weights move, for training, replay, resume and export alike: the per-tensor
scales, the shaped-reward update with its schedules, replay of logged iterations and restoring
from a checkpoint. Training and replay share these functions, so a replay repeats every
update bit for bit (docs/design.md, invariant 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .checkpoint import list_checkpoints
from .comm import Comm
from .config import Config, ConfigError, ESConfig, multiplier_for, parse_scale_multipliers
from .engine import Engine
from .errors import ReplayMismatch
from .perturb import MasterWeights, per_tensor_std
from .runlog import LogData
from .strategy import Population, scheduled, shape_rewards, update_coefficients
from .tensorfile import file_fingerprint


def load_replica(
    cfg: Config, comm: Comm, model_path: str | Path | None = None, data: LogData | None = None
) -> Engine:
    """A rank's model replica and master weights with their per-tensor scales (the logged ones
    when `data` is a run's log)."""
    kinds = (
        {}
        if data is None
        else {"noise_kind": data.noise_kind, "fingerprint_kind": data.fingerprint_kind}
    )
    engine = Engine.load(cfg, comm, model_path=model_path, **kinds)
    engine.weights.scales = sigma_scales(cfg, engine.weights, data)
    return engine


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


def scheduled_rates(es: ESConfig, iteration: int) -> tuple[float, float]:
    """(alpha, sigma) of `iteration` under es.alpha_schedule and es.sigma_schedule."""
    return (
        scheduled(
            es.alpha, es.alpha_schedule, es.alpha_final, es.alpha_decay_iterations, iteration
        ),
        scheduled(
            es.sigma, es.sigma_schedule, es.sigma_final, es.sigma_decay_iterations, iteration
        ),
    )


def apply_es_update(
    weights: MasterWeights,
    population: Population,
    rewards: np.ndarray,
    es: ESConfig,
    iteration: int,
) -> np.ndarray:
    """Shape the gathered rewards and move the master weights; returns the shaped weights.

    Training and replay both call this, so a replay repeats the update bit for bit.
    """
    shaped = shape_rewards(rewards, es.shaping, es.top_pairs)
    alpha, _ = scheduled_rates(es, iteration)
    weights.apply_update(update_coefficients(population, shaped, alpha))
    return shaped


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
    checkpoint at or before it whose fingerprint matches the log, then replay. Returns the
    checkpoint used. A checkpoint is checked as a stream and read into place, so this needs
    no memory beyond the master."""
    done = data.iterations_done if upto is None else upto
    start = 0
    for k, path in reversed(list_checkpoints(run_dir)):
        if 0 < k <= done and checkpoint_matches(path, data, k):
            weights.load_file(path)
            start = k
            break
    if done > start:
        replay_rows(weights, cfg, data, start, done, verify_each=False)
    return start


def checkpoint_matches(path: Path, data: LogData, iterations_done: int) -> bool:
    """Does the checkpoint hold the weights the log recorded after `iterations_done`
    iterations? False also for a damaged or unreadable file."""
    try:
        found = file_fingerprint(path, data.fingerprint_kind)
    except (OSError, ValueError, KeyError):
        return False
    return found == data.checksums[iterations_done - 1]
