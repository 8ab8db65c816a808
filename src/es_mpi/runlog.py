"""The HDF5 run log: config, base model identity and, per iteration, seeds and rewards.

Rank 0 alone writes it. Each append reopens the file, grows every dataset by one row, sets
the commit counter `iterations_done` last, flushes and closes: the file is closed between
iterations, so a SIGKILL leaves a readable log at most one iteration short (invariant 5).
Rows past `iterations_done` (a torn append) are ignored by readers and cut on resume.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .errors import RunLogError
from .noise import NEW_RUN_KIND

FORMAT = "es-mpi-runlog-1"
LOG_NAME = "run.h5"
# Version 2 names the noise streams (noise.py) and the per-iteration fingerprint
# (fingerprint.py) in attributes; a log without them is version 1, whose kinds these are.
# Version 3: counter noise (device-independent) and the devices of every session.
LOG_VERSION = 3
KINDS = {"noise": NEW_RUN_KIND, "fingerprint": "sums"}
VERSION_1_KINDS = {"noise": "tensor", "fingerprint": "sha256"}

# Per-iteration scalar columns: name -> dtype.
SCALARS = {
    "iteration": "i8",
    "reward_mean": "f8",
    "reward_max": "f8",
    "reward_min": "f8",
    "reward_std": "f8",
    "shaped_min": "f8",
    "shaped_max": "f8",
    "alpha": "f8",  # the iteration's alpha and sigma (es.*_schedule; relative units with
    "sigma": "f8",  # es.sigma_scale per_tensor_std)
    "update_norm_ratio": "f8",  # |theta_new - theta| / |theta|, all tensors together
    "tokens_per_second": "f8",  # generated tokens of all members / evaluation wall time
    "time_evaluate": "f8",
    "time_perturb": "f8",
    "time_communicate": "f8",
    "time_update": "f8",
    "time_fingerprint": "f8",
    "time_iteration": "f8",
    "wall_clock": "f8",
}
# Held-out evaluations (own counter): after how many iterations, and the scores.
HELDOUT = {
    "heldout_iteration": "i8",
    "heldout_reward": "f8",
    "heldout_accuracy": "f8",
    "heldout_kl": "f8",
}
# Per-iteration, per-member columns.
MEMBER_COLUMNS = {"member_seeds": "i8", "member_signs": "i1", "rewards": "f8", "shaped": "f8"}


@dataclass
class IterationRecord:
    iteration: int
    member_seeds: np.ndarray
    member_signs: np.ndarray
    rewards: np.ndarray
    shaped: np.ndarray
    checksum: str
    times: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LogData:
    """Everything a reader needs, truncated to the committed iterations."""

    attrs: dict
    columns: dict[str, np.ndarray]
    checksums: list[str]
    heldout: dict[str, np.ndarray]

    @property
    def iterations_done(self) -> int:
        return len(self.checksums)

    @property
    def noise_kind(self) -> str:
        return str(self.attrs.get("noise", VERSION_1_KINDS["noise"]))

    @property
    def fingerprint_kind(self) -> str:
        return str(self.attrs.get("fingerprint", VERSION_1_KINDS["fingerprint"]))


def _attr_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _commit_row(f: h5py.File, counter: str, n: int, row: dict, names) -> None:
    """Write row n of the named datasets (NaN where absent), then bump the commit counter."""
    for name in names:
        f[name].resize(n + 1, axis=0)
        f[name][n] = row.get(name, np.nan)
    f.flush()
    f.attrs[counter] = n + 1  # the commit point: readers ignore rows past it
    f.flush()


def _add_missing_columns(f: h5py.File, rows: int) -> None:
    """A log written by an older version gains the newer scalar columns (NaN so far)."""
    for name, dtype in SCALARS.items():
        if name not in f:
            f.create_dataset(
                name, data=np.full(rows, np.nan, dtype=dtype), maxshape=(None,), chunks=(256,)
            )


class RunLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(
        cls,
        path: str | Path,
        config_yaml: str,
        model_path: str,
        model_sha256: str,
        population: int,
        extra_attrs: dict | None = None,
    ) -> RunLog:
        log = cls(path)
        with h5py.File(log.path, "w") as f:
            f.attrs.update(
                {
                    "format": FORMAT,
                    "config_yaml": config_yaml,
                    "model_path": model_path,
                    "model_sha256": model_sha256,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "iterations_done": 0,
                    "heldout_done": 0,
                    "sessions": json.dumps([]),
                    "log_version": LOG_VERSION,
                    **KINDS,
                    **(extra_attrs or {}),
                }
            )
            for name, dtype in {**SCALARS, **HELDOUT}.items():
                f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
            for name, dtype in MEMBER_COLUMNS.items():
                f.create_dataset(
                    name,
                    shape=(0, population),
                    maxshape=(None, population),
                    dtype=dtype,
                    chunks=(16, population),
                )
            f.create_dataset("checksum", shape=(0,), maxshape=(None,), dtype="S64", chunks=(256,))
        return log

    def _open(self, mode: str) -> h5py.File:
        try:
            return h5py.File(self.path, mode, locking=False)
        except (OSError, KeyError) as exc:
            raise RunLogError(f"cannot open run log '{self.path}': {exc}") from exc

    def read(self) -> LogData:
        if not self.path.is_file():
            raise RunLogError(f"no run log at '{self.path}'")
        with self._open("r") as f:
            try:
                if _attr_str(f.attrs.get("format", "")) != FORMAT:
                    raise RunLogError(f"'{self.path}' is not an es-mpi run log")
                done = int(f.attrs["iterations_done"])
                attrs = {
                    k: (_attr_str(v) if isinstance(v, bytes | str) else v)
                    for k, v in f.attrs.items()
                }
                columns = {  # columns added after a log was created read as NaN
                    name: f[name][:done] if name in f else np.full(done, np.nan)
                    for name in (*SCALARS, *MEMBER_COLUMNS)
                }
                checksums = [c.decode() for c in f["checksum"][:done]]
                n_heldout = int(f.attrs["heldout_done"])
                heldout = {name: f[name][:n_heldout] for name in HELDOUT}
            except (KeyError, OSError, ValueError) as exc:
                raise RunLogError(f"run log '{self.path}' is damaged: {exc}") from exc
        if any(len(col) != done for col in columns.values()) or len(checksums) != done:
            raise RunLogError(f"run log '{self.path}' is truncated below iterations_done={done}")
        return LogData(attrs, columns, checksums, heldout)

    def append(self, record: IterationRecord) -> None:
        with self._open("a") as f:
            n = int(f.attrs["iterations_done"])
            if record.iteration != n:
                raise RunLogError(f"appending iteration {record.iteration} to a log of {n}")
            row = {
                "iteration": record.iteration,
                "reward_mean": float(np.mean(record.rewards)),
                "reward_max": float(np.max(record.rewards)),
                "reward_min": float(np.min(record.rewards)),
                "reward_std": float(np.std(record.rewards)),
                "shaped_min": float(np.min(record.shaped)),
                "shaped_max": float(np.max(record.shaped)),
                "member_seeds": record.member_seeds,
                "member_signs": record.member_signs,
                "rewards": record.rewards,
                "shaped": record.shaped,
                "checksum": record.checksum.encode(),
                "wall_clock": time.time(),
                **{f"time_{k}": v for k, v in record.times.items()},
                **record.metrics,
            }
            _add_missing_columns(f, n)
            _commit_row(f, "iterations_done", n, row, (*SCALARS, *MEMBER_COLUMNS, "checksum"))

    def append_heldout(
        self, iterations_done: int, reward: float, accuracy: float, kl: float = float("nan")
    ) -> None:
        with self._open("a") as f:
            row = {
                "heldout_iteration": iterations_done,
                "heldout_reward": reward,
                "heldout_accuracy": accuracy,
                "heldout_kl": kl,
            }
            _commit_row(f, "heldout_done", int(f.attrs["heldout_done"]), row, HELDOUT)

    def truncate_to_committed(self) -> int:
        """Cut rows of a torn append; returns the number of committed iterations."""
        with self._open("a") as f:
            n = int(f.attrs["iterations_done"])
            for name in (*SCALARS, *MEMBER_COLUMNS, "checksum"):
                if name in f and f[name].shape[0] != n:
                    f[name].resize(n, axis=0)
            n_heldout = int(f.attrs["heldout_done"])
            for name in HELDOUT:
                f[name].resize(n_heldout, axis=0)
            return n

    def integrity(self) -> str:
        """One line: committed rows, torn rows past the commit counters, dataset lengths."""
        with self._open("r") as f:
            done, n_held = int(f.attrs["iterations_done"]), int(f.attrs["heldout_done"])
            lengths = {f[n].shape[0] for n in (*SCALARS, *MEMBER_COLUMNS, "checksum") if n in f}
            held_lengths = {f[n].shape[0] for n in HELDOUT}
        torn = max(lengths) - done
        short = min(lengths) < done or min(held_lengths) < n_held
        if short:
            return f"DAMAGED: datasets shorter than the {done} committed iterations"
        extra = f", {torn} torn row(s) past the commit (ignored, cut on resume)" if torn else ""
        return f"ok: {done} committed iterations, {n_held} held-out evaluations{extra}"

    def add_session(self, info: dict) -> None:
        """Record a train/resume session (start iteration, world size, time) in the log."""
        with self._open("a") as f:
            sessions = json.loads(_attr_str(f.attrs.get("sessions", "[]")))
            sessions.append(info)
            f.attrs["sessions"] = json.dumps(sessions)

    def set_attrs(self, **attrs) -> None:
        with self._open("a") as f:
            f.attrs.update(attrs)
