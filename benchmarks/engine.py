"""Engine benchmark (`make bench`): ratios measured in one run on this machine.

1. Share of iteration time spent in noise + materialise + update (rank 0's clock).
2. Speed-up of `mpiexec -n 2` over `-n 1` (1 thread per rank), alternating runs, repeated.
3. Peak RSS per rank above the pre-model baseline, against the fp32 model size.

Every figure is a ratio between runs made here, one after another, in this process's session.
Usage: python benchmarks/engine.py [--config configs/countdown-plain.yaml] [--iterations 6]
       [--repeats 3] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


def train(run_dir: Path, ranks: int, config: Path, overrides: list[str]) -> Path:
    cmd = [
        MPIEXEC,
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "es_mpi",
        "train",
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
        "--overwrite",
    ]
    for item in overrides:
        cmd += ["--set", item]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark run failed:\n{result.stderr}")
    return run_dir / "run.h5"


def read_log(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with h5py.File(path, "r") as f:
        cols = {
            k: f[k][1:]
            for k in (
                "time_iteration",
                "time_perturb",
                "time_update",
                "time_evaluate",
                "time_communicate",
            )
        }  # skip warm-up
        memory = json.loads(f.attrs["memory"])
    return cols, memory


def population(config: Path, overrides: list[str]) -> int:
    from es_mpi.config_load import load_config

    return load_config(config, overrides).es.population


def fmt(values: list[float], unit: str = "") -> str:
    return f"min {min(values):.3f}{unit} median {statistics.median(values):.3f}{unit}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "countdown-plain.yaml")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--oversubscribed", default="4,8", help="rank counts run beyond the cores")
    args = p.parse_args()
    extra_ranks = [int(n) for n in args.oversubscribed.split(",") if n]
    overrides = [f"es.iterations={args.iterations}", "checkpoint.every=0", *args.set]
    print(
        f"config {args.config.name} {' '.join(overrides)}; {args.repeats} repeats, "
        f"first iteration of each run skipped"
    )

    shares, speedups, t1s, t2s, per_member = [], [], [], [], {1: [], 2: []}
    overhead: dict[int, list[float]] = {n: [] for n in extra_ranks}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            one, _ = read_log(train(Path(tmp) / f"n1-{r}", 1, args.config, overrides))
            two, _ = read_log(train(Path(tmp) / f"n2-{r}", 2, args.config, overrides))
            t1, t2 = (
                float(np.median(one["time_iteration"])),
                float(np.median(two["time_iteration"])),
            )
            t1s.append(t1)
            t2s.append(t2)
            speedups.append(t1 / t2)
            for ranks, cols in ((1, one), (2, two)):  # generation alone, per member, rank 0
                members = -(-population(args.config, overrides) // ranks)
                generate = (cols["time_evaluate"] - cols["time_perturb"]) / members
                per_member[ranks].append(float(np.median(generate)))
            share = (two["time_perturb"] + two["time_update"]) / two["time_iteration"]
            shares.extend(share.tolist())
            for n in extra_ranks:  # more ranks than cores: the cost against -n 2
                cols, _ = read_log(train(Path(tmp) / f"n{n}-{r}", n, args.config, overrides))
                overhead[n].append(float(np.median(cols["time_iteration"])) / t2)
        memory = measure_memory(Path(tmp), args.config)

    print("\n1. noise + materialise + update, share of iteration time at -n 2 (target <= 5%)")
    print(f"   per iteration: {fmt([100 * s for s in shares], '%')}")
    print(
        f"   update alone: median {1000 * float(np.median(two['time_update'])):.1f} ms, "
        f"materialise (own members): median {1000 * float(np.median(two['time_perturb'])):.1f} ms, "
        f"iteration median {1000 * t2s[-1]:.1f} ms, waiting in the allgather (rank 0) "
        f"median {1000 * float(np.median(two['time_communicate'])):.1f} ms"
    )
    print("\n2. speed-up of -n 2 over -n 1, median iteration time (target >= 1.85x)")
    print(f"   -n 1: {fmt(t1s, ' s')}; -n 2: {fmt(t2s, ' s')}")
    print(f"   speed-up: {fmt(speedups, 'x')}")
    slowdown = [b / a for a, b in zip(per_member[1], per_member[2], strict=True)]
    print(
        f"   generation time per member, -n 2 / -n 1 (two ranks sharing the machine): "
        f"{fmt(slowdown, 'x')}"
    )
    for n, ratios in overhead.items():
        print(f"   -n {n} (oversubscribed) / -n 2 iteration time: {fmt(ratios, 'x')}")
    print("\n3. peak RSS per rank above the pre-model baseline / fp32 model size (target <= 1.6x)")
    for label, mem in memory.items():
        size = mem["master_fp32_bytes"]
        pairs = zip(mem["peak_rss_bytes"], mem["rss_before_model_bytes"], strict=True)
        ratios = ", ".join(f"{(peak - base) / size:.2f}x" for peak, base in pairs)
        print(f"   {label}: model {size / 2**20:.0f} MiB fp32, per rank {ratios}")


def measure_memory(tmp: Path, config: Path) -> dict[str, dict]:
    """Peak RSS on a 27M-parameter model, where the model (not the runtime) dominates."""
    from es_mpi.tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp / "model-27m", hidden=512, layers=8, heads=8)
    small = [
        "task.eval_batch=8",
        "task.test_size=8",
        f"model.path={model}",
        "es.iterations=2",
        "es.population=4",
        "checkpoint.every=0",
        "task.prompts_per_member=8",
        "task.max_new_tokens=4",
    ]
    out = {}
    for dtype in ("float32", "bfloat16"):
        for cache_mb in (0, 256):
            overrides = [*small, f"model.eval_dtype={dtype}", f"es.noise_cache_mb={cache_mb}"]
            run = tmp / f"mem-{dtype}-{cache_mb}"
            out[f"{dtype} eval copy, noise cache {cache_mb} MiB"] = read_log(
                train(run, 2, config, overrides)
            )[1]
    return out


if __name__ == "__main__":
    main()
