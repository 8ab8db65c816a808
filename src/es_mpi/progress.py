"""What rank 0 shows while a run goes: a tqdm bar on a terminal, one line per iteration in
batch jobs (stdout not a terminal), held-out scores, and optional TensorBoard scalars."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from .evaluate import HeldoutScore
from .runlog import IterationRecord


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def tensorboard_writer(log_dir: Path):
    """A SummaryWriter, or a clear error when the optional tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(
            "runtime.tensorboard needs the tensorboard package (pip install tensorboard)"
        ) from exc
    return SummaryWriter(str(log_dir))


class Progress:
    """Rank 0's view of the run. Never created on other ranks."""

    def __init__(
        self,
        total: int,
        start: int,
        time_limit_minutes: float = 0.0,
        tensorboard_dir: Path | None = None,
        bar: bool | None = None,
        show_rates: bool = False,
    ) -> None:
        """show_rates: print each iteration's alpha and sigma (they follow a schedule)."""
        self.total, self.start = total, start
        self.show_rates = show_rates
        self.deadline = time.monotonic() + 60 * time_limit_minutes if time_limit_minutes else None
        self.seconds: list[float] = []
        self.last_heldout = ""
        use_bar = sys.stdout.isatty() if bar is None else bar
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)
        self.writer = tensorboard_writer(tensorboard_dir) if tensorboard_dir else None

    def eta_seconds(self, done: int) -> float:
        recent = self.seconds[-20:]
        eta = statistics.median(recent) * (self.total - done) if recent else float("nan")
        if self.deadline is not None:
            eta = min(eta, max(0.0, self.deadline - time.monotonic()))
        return eta

    def iteration(self, record: IterationRecord, heldout: HeldoutScore | None = None) -> None:
        done = record.iteration + 1
        scored = "" if heldout is None else f" held-out {100 * heldout.accuracy:.1f}%"
        seconds = record.times.get("iteration", float("nan"))
        self.seconds.append(seconds)
        rewards = record.rewards
        rates = ""
        if self.show_rates:
            rates = f" alpha {record.metrics['alpha']:.3g} sigma {record.metrics['sigma']:.3g}"
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"reward {rewards.mean():.4f} max {rewards.max():.4f}{self.last_heldout}",
                refresh=False,
            )
            self.bar.update(1)
        else:  # batch job: one compact line per iteration
            print(
                f"[es-mpi] it {done}/{self.total} reward {rewards.mean():.4f} "
                f"max {rewards.max():.4f}{rates}{scored} | {seconds:.2f} s/it "
                f"ETA {format_seconds(self.eta_seconds(done))}",
                flush=True,
            )
        if self.writer is not None:
            scalars = {
                "train/reward_mean": float(rewards.mean()),
                "train/reward_max": float(rewards.max()),
                "train/reward_std": float(rewards.std()),
                **{f"train/{k}": v for k, v in record.metrics.items()},
                **{f"time/{k}": v for k, v in record.times.items()},
            }
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, done)

    def heldout(
        self, done: int, score: HeldoutScore, prompts: int, seconds: float, kl: bool
    ) -> None:
        kl_text = f" KL to base {score.kl:.5f}" if kl else ""
        self.last_heldout = f" held-out {100 * score.accuracy:.1f}%"  # shown in the bar
        self.write(
            f"[es-mpi] held-out after {done} iterations: accuracy {100 * score.accuracy:.1f}% "
            f"reward {score.reward:.4f}{kl_text} ({prompts} prompts, {seconds:.1f}s)"
        )
        if self.writer is not None:
            self.writer.add_scalar("heldout/accuracy", score.accuracy, done)
            self.writer.add_scalar("heldout/reward", score.reward, done)
            if kl:
                self.writer.add_scalar("heldout/kl", score.kl, done)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
