"""Scale benchmark (`make bench-scale`): what ES costs per rank from 0.17M to 0.5B parameters.

Part 1 trains random models of real configurations with the real CLI (1 and 2 ranks, bf16
evaluation copy, N = 4, 4 prompts x 8 new tokens, a reward on which random members differ so
every update draws noise, one checkpoint, the final save) and reads from each run's log:
start-up seconds, peak RSS per rank above the pre-model baseline / fp32 model bytes, seconds
per member to materialise, seconds per noise draw of the update, fingerprint seconds,
generated tokens per second and each one's share of the iteration (median over the
iterations after the first). The 0.5B model also runs the conciseness task, whose KL
reference is a second copy of the model. Part 2 times noise, materialise and update per
parameter in this process: the `counter` noise of new runs (format 3) against the `chunked`
(format 2) and `tensor` (format 1) noise of older logs and torch.randn (`--micro-only`: just
this part). Writes a table (stdout and bench-results/scale.md), a JSON file and a PNG of cost
against parameter count. Usage: python benchmarks/scale.py [--models a,b] [--ranks 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_models import build_random_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
OUT = ROOT / "bench-results"
MODELS_DIR = ROOT / "runs" / "scale-models"
SIZES = ("default-base", "llama-27m", "llama-135m", "qwen2.5-0.5b")
PARAMS_7B = 7.6e9  # Qwen2.5-7B


def model_dir(name: str) -> Path:
    if name == "default-base":
        return ROOT / "models" / "tiny-countdown-h64"
    out = MODELS_DIR / name
    if name == "llama-27m":
        from es_mpi.tiny_model import build_tiny_llama

        if not (out / "model.safetensors").is_file():
            build_tiny_llama(out, hidden=512, layers=8, heads=8)
        return out
    return build_random_model(name, out)


def train(name: str, ranks: int, task: str, run_dir: Path) -> dict:
    overrides = {
        "model.path": model_dir(name),
        "model.eval_dtype": "bfloat16",
        "task.name": task,
        "es.population": 4,
        "es.iterations": 4,
        "es.noise_cache_mb": 0,
        "task.prompts_per_member": 4,
        "task.max_new_tokens": 8,
        "task.train_size": 100,
        "task.test_size": 4,
        "task.eval_batch": 4,
        "task.eval_every": 0,
        "checkpoint.every": 2,
        "runtime.threads": max(1, 2 // ranks),
    }
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "es_mpi", "train"]
    cmd += ["--config", str(ROOT / "configs" / "default.yaml"), "--run-dir", str(run_dir)]
    cmd += ["--overwrite"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"run {name} x{ranks} failed:\n{result.stderr[-3000:]}")
    return read_run(run_dir, ranks, time.perf_counter() - t0)


def read_run(run_dir: Path, ranks: int, wall: float) -> dict:
    with h5py.File(run_dir / "run.h5", "r") as f:
        col = {k: f[k][1:] for k in f if k.startswith("time_") or k == "tokens_per_second"}
        memory = json.loads(f.attrs["memory"])
        session = json.loads(f.attrs["sessions"])[0]
        population = f["rewards"].shape[1]
        moved = bool(np.any(f["shaped"][1:] != 0))
    fp32 = memory["master_fp32_bytes"]
    peaks = [
        (p - b) / fp32
        for p, b in zip(memory["peak_rss_bytes"], memory["rss_before_model_bytes"], strict=True)
    ]
    it = statistics.median(col["time_iteration"])
    members_rank0 = -(-population // ranks)

    def med(name: str) -> float:
        return float(statistics.median(col[f"time_{name}"]))

    generate = med("evaluate") - med("perturb")
    return {
        "params": fp32 // 4,
        "ranks": ranks,
        "load_s": session["load_seconds"],
        "wall_s": wall,
        "peak_ratio": max(peaks),
        "iteration_s": it,
        "materialise_s_per_member": med("perturb") / members_rank0,
        "update_s_per_draw": med("update") / (population // 2),  # mirrored pairs: N/2 draws
        "fingerprint_s": med("fingerprint"),
        "tokens_per_s": float(statistics.median(col["tokens_per_second"])),
        "share_materialise": med("perturb") / it,
        "share_update": med("update") / it,
        "share_fingerprint": med("fingerprint") / it,
        "share_generate": generate / it,
        "update_drew_noise": moved,
    }


class Flat(nn.Module):
    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(numel, dtype=dtype), requires_grad=False)


def per_parameter_costs(numel: int, repeats: int) -> dict[str, dict[str, float]]:
    """ns per parameter (min and median of `repeats`) of the engine's steps, one process."""
    from es_mpi.fingerprint import fingerprint
    from es_mpi.noise import NoiseSource
    from es_mpi.perturb import MasterWeights

    torch.manual_seed(0)
    master = {"w": torch.randn(numel) * 0.02}
    cases = {
        "materialise bf16, tensor noise (format 1)": ("tensor", 1, "m"),
        "materialise bf16, chunked noise (format 2), 1 lane": ("chunked", 1, "m"),
        "materialise bf16, chunked noise (format 2), 2 lanes": ("chunked", 2, "m"),
        "materialise bf16, counter noise (format 3; torch's own threads)": ("counter", 2, "m"),
        "update per draw, tensor noise": ("tensor", 1, "u"),
        "update per draw, chunked noise, 2 lanes": ("chunked", 2, "u"),
        "update per draw, counter noise (format 3)": ("counter", 2, "u"),
    }
    out = {}
    for label, (kind, lanes, what) in cases.items():
        weights = MasterWeights(
            Flat(numel, torch.bfloat16), {"w": master["w"].clone()}, noise_kind=kind, lanes=lanes
        )
        times = []
        for r in range(repeats + 1):  # the first warms buffers up
            t0 = time.perf_counter()
            if what == "m":
                weights.materialise(r, 1, 0.01)
            else:
                weights.apply_update([(r, 1e-3), (r + 100, -1e-3)])
            times.append((time.perf_counter() - t0) / (1 if what == "m" else 2))
        out[label] = times[1:]
        del weights
    counter = NoiseSource("cpu", "counter")
    generator = NoiseSource("cpu", "chunked")
    buffer = torch.empty(numel)
    for label, work in (
        ("counter noise alone (format 3)", lambda: counter.fill(buffer, 1, "w")),
        ("torch generator noise alone (chunked kind)", lambda: generator.fill(buffer, 1, "w")),
        ("fingerprint (sums)", lambda: fingerprint(master, "sums")),
        ("fingerprint (sha256, older logs)", lambda: fingerprint(master, "sha256")),
        ("torch.randn (reference)", lambda: torch.randn(numel)),
    ):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
        out[label] = times
    return {
        k: {"min": 1e9 * min(v) / numel, "median": 1e9 * statistics.median(v) / numel}
        for k, v in out.items()
    }


def table(rows: list[dict]) -> str:
    head = (
        "| model | params | ranks | load s | peak / fp32 | s/it | materialise s/member | "
        "update s/draw | fingerprint s | tokens/s | shares: materialise / update / "
        "fingerprint / generate |\n" + "|---" * 10 + "|\n"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['ranks']} | {r['load_s']:.1f} | "
            f"{r['peak_ratio']:.2f} | {r['iteration_s']:.2f} | "
            f"{r['materialise_s_per_member']:.3f} | {r['update_s_per_draw']:.3f} | "
            f"{r['fingerprint_s']:.4f} | {r['tokens_per_s']:.0f} | "
            f"{100 * r['share_materialise']:.1f}% / {100 * r['share_update']:.1f}% / "
            f"{100 * r['share_fingerprint']:.2f}% / {100 * r['share_generate']:.1f}% |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    one = sorted(
        (r for r in rows if r["ranks"] == 1 and r["task"] != "conciseness"),
        key=lambda r: r["params"],
    )
    x = [r["params"] for r in one]
    for key, label in (
        ("load_s", "start-up"),
        ("materialise_s_per_member", "materialise / member"),
        ("update_s_per_draw", "update / noise draw"),
        ("fingerprint_s", "fingerprint"),
        ("iteration_s", "iteration (N = 4)"),
    ):
        ax.loglog(x, [r[key] for r in one], marker="o", label=label)
    ax.set_xlabel("parameters")
    ax.set_ylabel("seconds (1 rank, 2 threads, 2-core CPU)")
    ax.set_title("es-mpi cost against model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(SIZES))
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--micro-params", type=int, default=64 * 2**20)
    p.add_argument("--micro-only", action="store_true", help="only the ns-per-parameter part")
    args = p.parse_args()
    if args.micro_only:
        micro = per_parameter_costs(args.micro_params, args.repeats)
        for k, v in micro.items():
            print(f"- {k}: {v['min']:.2f} / {v['median']:.2f} ns per parameter (min / median)")
        return
    OUT.mkdir(exist_ok=True)
    task = "scale_task:CompletionChecksum"
    rows = []
    runs = ROOT / "runs" / "scale"
    for name in args.models.split(","):
        for ranks in (int(r) for r in args.ranks.split(",")):
            row = train(name, ranks, task, runs / f"{name}-{ranks}")
            rows.append({"name": name, "task": "checksum", **row})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    if "qwen2.5-0.5b" in args.models:
        row = train("qwen2.5-0.5b", 1, "conciseness", runs / "qwen-conciseness")
        rows.append({"name": "qwen2.5-0.5b, conciseness (KL copy)", "task": "conciseness", **row})
    micro = per_parameter_costs(args.micro_params, args.repeats)
    text = table(rows)
    text += f"\nns per parameter on a {args.micro_params / 2**20:.0f}M-element tensor, 2 threads "
    text += f"(min / median of {args.repeats}):\n\n"
    text += "\n".join(f"- {k}: {v['min']:.2f} / {v['median']:.2f}" for k, v in micro.items())
    big = max(rows, key=lambda r: r["params"] if r["task"] == "checksum" else 0)
    scale = PARAMS_7B / big["params"]
    text += (
        f"\n\n7B on this CPU, scaled per parameter from the {big['name']} row (1 rank): "
        f"materialise {big['materialise_s_per_member'] * scale:.0f} s per member, update "
        f"{big['update_s_per_draw'] * scale:.0f} s per noise draw, fingerprint "
        f"{big['fingerprint_s'] * scale:.2f} s, start-up {big['load_s'] * scale:.0f} s.\n"
    )
    print("\n" + text)
    (OUT / "scale.md").write_text(text)
    (OUT / "scale.json").write_text(json.dumps({"runs": rows, "per_parameter_ns": micro}, indent=1))
    plot(rows, OUT / "scale.png")
    print(f"wrote {OUT / 'scale.md'}, scale.json, scale.png")


if __name__ == "__main__":
    main()
