"""One ES iteration on one screen: deal -> evaluate -> gather -> shape -> update -> log."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoint import save_checkpoint
from .comm import deal_members
from .engine import Engine, peak_rss_bytes, synchronize
from .errors import Interrupted
from .evaluate import Evaluator, HeldoutScore, PromptBatch, heldout_score
from .launch import job_end_time
from .lowrank import PopulationHooks
from .progress import Progress
from .runlog import IterationRecord, RunLog
from .stopping import StopWatch, stop_signal
from .strategy import (
    Population,
    member_population,
    prompt_indices,
    replace_nonfinite,
)
from .tasks import Task, reports_kl
from .update import apply_es_update, scheduled_rates


class Trainer:
    def __init__(self, engine: Engine, task: Task, run_dir: Path, log: RunLog | None) -> None:
        self.engine, self.cfg, self.comm = engine, engine.cfg, engine.comm
        self.weights = engine.weights
        self.task = task
        self.run_dir = run_dir
        self.log = log  # rank 0 only
        self.progress: Progress | None = None  # rank 0 only, made by run()
        self.logging_seconds: list[float] = []  # rank 0: log append + progress, per iteration
        runtime = self.cfg.runtime
        self.clock = StopWatch(
            runtime.time_limit_minutes, job_end_time(), runtime.stop_margin_seconds
        )
        # A frozen copy of the base model, for tasks that report KL from it (conciseness).
        self.base_model = engine.load_base_copy() if reports_kl(task) else None
        self.evaluator = Evaluator.for_config(
            engine.model, engine.tokenizer, task, self.cfg, engine.model_path
        )
        # es.mode lowrank: members are evaluated through hooks, never materialised
        lowrank = self.weights.lowrank
        self.hooks = None if lowrank is None else PopulationHooks(engine.model, lowrank)
        self.evaluator.population = self.hooks

    def prompt_batch(self, iteration: int) -> PromptBatch:
        """The same prompts for every member and rank, drawn from (run seed, iteration)."""
        idx = prompt_indices(
            self.cfg.seed, iteration, len(self.task.train), self.cfg.task.prompts_per_member
        )
        return self.evaluator.encode([self.task.train[i] for i in idx])

    def evaluate_members(
        self, members: range, population: Population, batch: PromptBatch, sigma: float
    ) -> tuple[list[float], float]:
        """Mean reward of each of this rank's members; also the seconds spent materialising."""
        if self.hooks is not None:
            return self.evaluate_member_groups(members, population, batch, sigma)
        rewards, perturb_seconds = [], 0.0
        for n in members:
            t0 = time.perf_counter()
            self.weights.materialise(int(population.seeds[n]), int(population.signs[n]), sigma)
            synchronize(self.engine.device)  # GPU kernels are queued: time them, not the queueing
            perturb_seconds += time.perf_counter() - t0
            rewards.append(float(self.evaluator.rewards(batch).mean()))
        return rewards, perturb_seconds

    def evaluate_member_groups(
        self, members: range, population: Population, batch: PromptBatch, sigma: float
    ) -> tuple[list[float], float]:
        """Low-rank mode: es.members_per_batch members per batched generation (hooks)."""
        group = self.cfg.es.members_per_batch
        dtype = next(self.engine.model.parameters()).dtype
        rewards, perturb_seconds = [], 0.0
        for first in range(members.start, members.stop, group):
            ids = slice(first, min(first + group, members.stop))
            t0 = time.perf_counter()
            self.hooks.activate(
                population.seeds[ids].tolist(),
                population.signs[ids].tolist(),
                sigma,
                self.weights.scales,
                dtype,
            )
            synchronize(self.engine.device)
            perturb_seconds += time.perf_counter() - t0
            size = ids.stop - ids.start
            try:
                row_rewards = self.evaluator.rewards(batch.repeat(size))
            finally:
                self.hooks.deactivate()
            rewards += row_rewards.reshape(size, -1).mean(axis=1).tolist()
        return rewards, perturb_seconds

    def step(self, iteration: int) -> IterationRecord:
        es = self.cfg.es
        t_start = time.perf_counter()
        population = member_population(self.cfg.seed, iteration, es.population, es.antithetic)
        # Dealt member by member, not pair by pair: an odd number of pairs would leave one
        # rank two members more; a pair split between ranks costs one extra noise draw only.
        members = self.comm.my_members(es.population, es.members_per_batch)
        tokens_before = self.evaluator.generated_tokens
        alpha, sigma = scheduled_rates(es, iteration)
        local_rewards, t_perturb = self.evaluate_members(
            members, population, self.prompt_batch(iteration), sigma
        )
        t_evaluated = time.perf_counter()
        rewards = self.comm.gather_rewards(members, population.seeds, local_rewards, es.population)
        rewards = self.check_finite(rewards, population, iteration)
        t_gathered = time.perf_counter()
        tokens = self.comm.gather(self.evaluator.generated_tokens - tokens_before)
        shaped = apply_es_update(self.weights, population, rewards, es, iteration)
        t_updated = time.perf_counter()
        checksum = self.agreed_checksum(iteration)
        t_fingerprinted = time.perf_counter()
        metrics = {
            "alpha": alpha,
            "sigma": sigma,
            "update_norm_ratio": self.weights.update_norm_ratio,
            # all ranks' generated tokens over the time until the slowest rank was done
            "tokens_per_second": sum(tokens) / (t_gathered - t_start) if tokens else float("nan"),
        }
        times = {
            "evaluate": t_evaluated - t_start,
            "perturb": t_perturb,
            "communicate": t_gathered - t_evaluated,
            "update": t_updated - t_gathered,
            "fingerprint": t_fingerprinted - t_updated,
            "iteration": time.perf_counter() - t_start,
        }
        return IterationRecord(
            iteration, population.seeds, population.signs, rewards, shaped, checksum, times, metrics
        )

    def check_finite(self, rewards: np.ndarray, population: Population, iteration: int):
        """Apply es.nonfinite_rewards; every rank sees the same vector and decides alike."""
        bad = np.flatnonzero(~np.isfinite(rewards))
        if not len(bad):
            return rewards
        es = self.cfg.es
        if es.nonfinite_rewards == "worst":
            return replace_nonfinite(rewards)
        n = int(bad[0])
        rank = next(
            r
            for r in range(self.comm.size)
            if n in deal_members(es.population, self.comm.size, r, es.members_per_batch)
        )
        raise FloatingPointError(
            f"reward {rewards[n]} of member {n} (seed {int(population.seeds[n])}) in iteration "
            f"{iteration}, scored on rank {rank} ({len(bad)} non-finite in all; "
            "es.nonfinite_rewards=worst scores them as the lowest finite reward)"
        )

    def agreed_checksum(self, iteration: int) -> str:
        """The master's fingerprint on rank 0 (fingerprint.py); every runtime.verify_every
        iterations each rank computes it and all must agree (replicas that drifted apart stop
        the job)."""
        every = self.cfg.runtime.verify_every
        if not (every and (iteration + 1) % every == 0):
            return self.weights.checksum() if self.comm.is_main else ""
        checksums = self.comm.allgather(self.weights.checksum())
        if len(set(checksums)) > 1:
            ranks = [r for r, c in enumerate(checksums) if c != checksums[0]]
            raise RuntimeError(
                f"master weights differ between ranks after iteration {iteration}: "
                f"ranks {ranks} disagree with rank 0"
            )
        return checksums[0]

    def run(self, start: int) -> None:
        total = self.cfg.es.iterations
        if self.comm.is_main:
            print(
                f"[es-mpi] {self.comm.size} rank(s), device {self.engine.device}, "
                f"{self.weights.numel:,} parameters, iterations {start}..{total}",
                flush=True,
            )
            runtime = self.cfg.runtime
            self.progress = Progress(
                total,
                start,
                runtime.time_limit_minutes,
                self.run_dir / "tensorboard" if runtime.tensorboard else None,
                show_rates=self.cfg.es.alpha_schedule != "constant"
                or self.cfg.es.sigma_schedule != "constant",
            )
        scored_at = None  # iterations done at the latest held-out evaluation
        if start == 0:
            self.evaluate_heldout(0)
            scored_at = 0
        done = start
        while done < total:
            reason = self.stop_reason()
            if reason == "time limit" and scored_at != done:  # the budget's result is scored
                self.evaluate_heldout(done)
            if reason is not None:  # resumable: checkpoint, exit 75, no final/
                self.interrupt(done, reason)
            t_loop = time.monotonic()
            record = self.step(done)
            done += 1
            t_logged = 0.0
            if self.comm.is_main:  # the row is on disk before anything else can fail
                t0 = time.perf_counter()
                self.log.append(record)
                t_logged = time.perf_counter() - t0
            score = None
            every = self.cfg.task.eval_every
            if every and done % every == 0:
                score = self.evaluate_heldout(done)
                scored_at = done
            if self.comm.is_main:
                t0 = time.perf_counter()
                self.progress.iteration(record, score)
                self.logging_seconds.append(t_logged + time.perf_counter() - t0)
                self.maybe_checkpoint(done, record.checksum)
            self.clock.loop_seconds.append(time.monotonic() - t_loop)
        if scored_at != done:
            self.evaluate_heldout(done)
        self.finish()

    def stop_reason(self) -> str | None:
        """Collective: a signal on any rank, or rank 0's clock (the session's time limit,
        the job's end), stops every rank before the same iteration."""
        reason = self.clock.reason() if self.comm.is_main else stop_signal()
        return next((r for r in self.comm.allgather(reason) if r), None)

    def interrupt(self, done: int, reason: str) -> None:
        """Checkpoint the master (rank 0) and leave with Interrupted (exit code 75)."""
        if self.comm.is_main:
            self.checkpoint(done, self.weights.checksum())
            self.progress.close()
            print(
                f"[es-mpi] {reason}: stopped after iteration {done} of {self.cfg.es.iterations} "
                f"(checkpoint written, exit 75); continue with: es-mpi resume --run-dir "
                f"{self.run_dir}",
                flush=True,
            )
        raise Interrupted(reason)

    def evaluate_heldout(self, iterations_done: int) -> HeldoutScore:
        """Score the unperturbed master on the held-out split; rank 0 logs and prints it."""
        t0 = time.perf_counter()
        self.weights.load_master()
        score = heldout_score(
            self.evaluator, self.task.test, self.comm, self.cfg.task.eval_batch, self.base_model
        )
        if self.comm.is_main:
            self.log.append_heldout(iterations_done, score.reward, score.accuracy, score.kl)
            self.progress.heldout(
                iterations_done,
                score,
                len(self.task.test),
                time.perf_counter() - t0,
                kl=self.base_model is not None,
            )
        return score

    def maybe_checkpoint(self, iterations_done: int, checksum: str) -> None:
        every = self.cfg.checkpoint.every
        if every and iterations_done % every == 0:
            self.checkpoint(iterations_done, checksum)

    def checkpoint(self, iterations_done: int, checksum: str) -> None:
        t0 = time.monotonic()
        state = self.weights.state_dict()
        save_checkpoint(self.run_dir, iterations_done, state, checksum, self.cfg.checkpoint.keep)
        self.clock.checkpoint_seconds = time.monotonic() - t0

    def finish(self) -> None:
        """Write final/ (rank 0) and the per-rank peak memory into the log."""
        rss = self.comm.gather((peak_rss_bytes(), self.engine.rss_before_model))
        if not self.comm.is_main:
            return
        self.progress.close()
        if self.logging_seconds:
            self.log.set_attrs(
                logging_overhead=json.dumps(
                    {  # this session: seconds per iteration spent logging and reporting
                        "median_seconds": float(np.median(self.logging_seconds)),
                        "max_seconds": float(np.max(self.logging_seconds)),
                        "iterations": len(self.logging_seconds),
                    }
                )
            )
        self.log.set_attrs(
            memory=json.dumps(
                {
                    "peak_rss_bytes": [r[0] for r in rss],
                    "rss_before_model_bytes": [r[1] for r in rss],
                    "master_fp32_bytes": self.weights.numel * 4,
                }
            )
        )
        self.engine.save_master(self.run_dir / "final")
        print(
            f"[es-mpi] done: final model in {self.run_dir / 'final'}", file=sys.stdout, flush=True
        )
