"""When a session stops before its last iteration: a signal, its own time limit, or the
batch job's end. Every such stop is resumable (checkpoint, exit 75, no final/); the ranks
agree on it through one allgather in Trainer.stop_reason."""

from __future__ import annotations

import signal
import time


def out_of_time(
    elapsed: float, loop_seconds: list[float], limit_seconds: float, reserve: float = 0.0
) -> bool:
    """Would the next iteration, estimated as the longest of the last 20, plus `reserve`
    seconds end past the limit? Never before a session's first iteration (no estimate)."""
    return bool(loop_seconds) and elapsed + max(loop_seconds[-20:]) + reserve > limit_seconds


# The first stop signal this process received (signal handlers are process-wide).
_received: list[str] = []


def listen_for_stop_signals() -> None:
    """SIGTERM and SIGUSR1 (a scheduler's warning before the time limit, a preemption, PBS at
    the walltime) ask for a stop at the next iteration boundary. Installed when the CLI
    starts, so a signal during the model load is a clean stop, not a death by signal.
    Repeats are ignored: schedulers deliver one request several times (to the batch shell,
    to srun, to every task), and the kill after a missed deadline comes from them anyway."""

    def handler(signum, frame) -> None:
        if not _received:
            _received.append(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, handler)


def stop_signal() -> str | None:
    return _received[0] if _received else None


class StopWatch:
    """Rank 0's view of the session clock: its time limit and the job's end."""

    def __init__(
        self, time_limit_minutes: float, job_end: float | None, margin_seconds: float
    ) -> None:
        self.started = time.monotonic()
        # The job's end in this session's monotonic clock, less the margin kept free for
        # the shutdown and the requeue.
        self.job_deadline = (
            None if job_end is None else job_end - time.time() + self.started - margin_seconds
        )
        self.limit_seconds = 60 * time_limit_minutes
        self.loop_seconds: list[float] = []  # this session's iterations, held-out included
        self.checkpoint_seconds = 0.0  # the latest checkpoint's duration

    def reason(self) -> str | None:
        """Why to stop before the next iteration: a signal, or rank 0's clock."""
        if stop_signal() is not None:
            return stop_signal()
        now = time.monotonic()
        if self.limit_seconds and out_of_time(
            now - self.started, self.loop_seconds, self.limit_seconds
        ):
            return "time limit"
        if self.job_deadline is not None and out_of_time(
            now - self.started,
            self.loop_seconds,
            self.job_deadline - self.started,
            self.checkpoint_seconds,
        ):
            return "job end"
        return None
