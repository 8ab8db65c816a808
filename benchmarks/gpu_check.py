"""The checks of one GPU machine (benchmarks/gpu_check.sh runs this): one summary line per
check and a JSON file.

1. rank-count invariance on the device: full mode at 1 and 2 ranks, low-rank at 1 and 3
   (equal final fingerprints, and the weights moved);
2. replay of the 2-rank run on the device, and on the CPU (counter noise: the same bits);
3. one iteration of a random model of Qwen2.5-0.5B's dimensions (bf16 copy, N = 8, P = 64
   prompts, 512 new tokens) in full and low-rank mode, against the fastest pure batched
   greedy generation of the same rows (full: N x one generation of the P prompts,
   low-rank: one batch of N x P rows; hf generate with its dynamic and its static cache,
   the fast decoder with eager steps and with CUDA graphs), with peak device memory /
   model bytes; the fast decoder's tokens from CUDA graph replays against its eager steps.

`--device cpu --size small` is the dry run (a tiny model, the same code paths).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

SMALL_RUN = {  # the invariance runs: a tiny model, a reward on which members differ
    "es": {"population": 6, "iterations": 4, "sigma": 0.3, "alpha": 0.02},
    "task": {
        "name": "conciseness",
        "prompts_per_member": 4,
        "max_new_tokens": 8,
        "train_size": 50,
        "test_size": 8,
    },
    "checkpoint": {"every": 2},
}


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def final_fingerprint(run_dir: Path) -> tuple[int, str, int]:
    with h5py.File(run_dir / "run.h5", "r") as f:
        done = int(f.attrs["iterations_done"])
        sums = [c.decode() for c in f["checksum"][:done]]
    return done, sums[-1], len(set(sums))


def invariance(args, model: Path, out: Path) -> dict:
    results = {}
    for mode, ranks in (("full", (1, 2)), ("lowrank", (1, 3))):
        extra = {"mode": "lowrank", "rank": 2, "members_per_batch": 3} if mode == "lowrank" else {}
        cfg = {**SMALL_RUN, "model": {"path": str(model)}}
        cfg["es"] = {**cfg["es"], **extra}
        config = out / f"{mode}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        finals = {}
        for n in ranks:
            run_dir = out / f"{mode}-{n}"
            cmd = [args.mpiexec, "-n", str(n), sys.executable, "-m", "es_mpi", "train"]
            cmd += ["--config", str(config), "--run-dir", str(run_dir), "--overwrite"]
            result = run([*cmd, "--device", args.device])
            if result.returncode != 0:
                raise SystemExit(f"{mode} at {n} ranks failed:\n{result.stderr[-3000:]}")
            finals[n] = final_fingerprint(run_dir)
        equal = len({f[1] for f in finals.values()}) == 1
        moved = min(f[2] for f in finals.values()) > 1
        results[mode] = {"ranks": list(ranks), "equal": equal, "moved": moved, "finals": finals}
        line(f"invariance {mode} {'/'.join(map(str, ranks))} ranks", equal and moved, finals)
    return results


def replays(args, out: Path) -> dict:
    results = {}
    for device in dict.fromkeys((args.device, "cpu")):
        cmd = [sys.executable, "-m", "es_mpi", "replay", "--run-dir", str(out / "full-2")]
        result = run([*cmd, "--out", str(out / f"replayed-{device}"), "--device", device])
        ok = result.returncode == 0
        results[device] = {"returncode": result.returncode, "tail": result.stdout[-300:]}
        line(f"replay of the {args.device} run on {device}", ok, result.stdout.strip()[-120:])
    return results


def iteration_against_generation(args, model: Path, out: Path) -> dict:
    """In-process: one warm-up step, then the timed step, then pure generation."""
    from es_mpi.comm import Comm
    from es_mpi.config_load import load_config
    from es_mpi.engine import Engine, synchronize
    from es_mpi.tasks import make_task
    from es_mpi.trainer import Trainer
    from es_mpi.update import sigma_scales

    results = {}
    for mode in ("full", "lowrank"):
        sets = [
            f"model.path={model}",
            "model.eval_dtype=bfloat16",
            f"runtime.device={args.device}",
            f"es.population={args.population}",
            f"task.prompts_per_member={args.prompts}",
            f"task.max_new_tokens={args.tokens}",
            "task.name=scale_task:CompletionChecksum",
            "task.eval_batch=64",
        ]
        if mode == "lowrank":
            sets += ["es.mode=lowrank", "es.rank=1", f"es.members_per_batch={args.population}"]
        cfg = load_config(None, sets)
        engine = Engine.load(cfg, Comm.serial())
        engine.weights.scales = sigma_scales(cfg, engine.weights)
        trainer = Trainer(engine, make_task(cfg.task), out, None)
        device = engine.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.step(0)
        synchronize(device)
        t0 = time.perf_counter()
        trainer.step(1)
        synchronize(device)
        step = time.perf_counter() - t0
        # the iteration's peak, before the baselines below allocate their own caches
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        engine.weights.load_master()
        batch = trainer.prompt_batch(1)
        rows = batch.repeat(args.population) if mode == "lowrank" else batch
        repeats = 1 if mode == "lowrank" else args.population
        variants = generation_times(trainer.evaluator, rows, repeats, device)
        generate = min(v["seconds"] for v in variants.values() if "seconds" in v)
        model_bytes = 2 * engine.weights.numel
        target = 0.9 if mode == "full" else 0.8
        ratio = generate / step
        results[mode] = {
            "step_s": step,
            "generate_s": generate,
            "generation_variants": variants,
            "speed_ratio": ratio,
            "target": target,
            "peak_over_bf16_model": None if peak is None else peak / model_bytes,
            "params": engine.weights.numel,
        }
        peak_text = "n/a" if peak is None else f"{peak / model_bytes:.2f}x the bf16 model"
        line(
            f"{mode} iteration vs batched generation ({engine.weights.numel / 1e6:.2f}M params)",
            ratio >= target,
            f"step {step:.2f} s, best generation {generate:.2f} s, ratio {ratio:.2f} (target "
            f">= {target}), peak device memory {peak_text}",
        )
        del trainer, engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


GENERATORS = {  # name: (runtime.decoder, CUDA graphs, transformers cache implementation)
    "hf generate": ("hf", False, None),
    "hf generate, static cache": ("hf", False, "static"),
    "fast, eager steps": ("fast", False, None),
    "fast, CUDA graph": ("fast", True, None),
}


def generation_times(evaluator, rows, repeats: int, device) -> dict:
    """Pure greedy generation of `rows` with each decoder: a warm-up call (CUDA graph capture,
    allocator), then one timed call; seconds = `repeats` x that call (N members' worth in
    full mode), and how many rows give the tokens of the first decoder."""
    from es_mpi.engine import synchronize
    from es_mpi.evaluate import Evaluator

    results, outs, first = {}, {}, None
    for name, (decoder, graphs, cache) in GENERATORS.items():
        if graphs and device.type != "cuda":
            continue
        gen = Evaluator(
            evaluator.model,
            evaluator.tokenizer,
            evaluator.task,
            evaluator.generation.max_new_tokens,
            decoder,
            evaluator.prompter,
            graphs,
        )
        gen.generation.cache_implementation = cache
        try:
            out, _ = gen.generate(rows)
        except Exception as err:  # a transformers without this cache: report, go on
            results[name] = {"error": repr(err)[:200]}
            continue
        synchronize(device)
        t0 = time.perf_counter()
        gen.generate(rows)
        synchronize(device)
        seconds = repeats * (time.perf_counter() - t0)
        first = out if first is None else first
        outs[name] = out
        width = min(out.shape[1], first.shape[1])
        same = int((out[:, :width] == first[:, :width]).all(1).sum())
        results[name] = {"seconds": seconds, "rows_equal_to_first": f"{same}/{out.shape[0]}"}
        print(f"[gpu-check]   {name}: {seconds:.3f} s, rows as the first: {same}/{out.shape[0]}")
    graph, eager = outs.get("fast, CUDA graph"), outs.get("fast, eager steps")
    if graph is not None and eager is not None:
        from es_mpi.decode import GRAPH_CAPTURES

        equal = graph.shape == eager.shape and torch.equal(graph, eager)
        ok = equal and GRAPH_CAPTURES["failed"] == 0
        results["graph vs eager"] = {"tokens_equal": equal, **GRAPH_CAPTURES}
        detail = f"tokens equal: {equal}, decode calls {GRAPH_CAPTURES}"
        line("fast decoder: CUDA graph replays give the eager steps' tokens", ok, detail)
    return results


def line(name: str, ok: bool, detail) -> None:
    print(f"[gpu-check] {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=("0.5b", "small"), default="0.5b")
    p.add_argument("--mpiexec", default="mpiexec")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "gpu-check")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--prompts", type=int, help="P (default: 64 at 0.5b, 16 small)")
    p.add_argument("--tokens", type=int, help="new tokens (default: 512 at 0.5b, 64 small)")
    args = p.parse_args()
    big = args.size == "0.5b"  # generation long enough to dominate, as in real runs
    args.prompts = args.prompts or (64 if big else 16)
    args.tokens = args.tokens or (512 if big else 64)
    args.out.mkdir(parents=True, exist_ok=True)
    from scale_models import build_random_model

    from es_mpi.engine import device_description, pick_device, software_versions
    from es_mpi.tiny_model import build_tiny_llama

    report = {
        "device": device_description(pick_device(args.device, 0)),
        "software": software_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"[gpu-check] {report['device']}; {report['software']}", flush=True)
    tiny = build_tiny_llama(args.out / "tiny", hidden=64, layers=2, heads=4)
    report["invariance"] = invariance(args, tiny, args.out)
    report["replay"] = replays(args, args.out)
    if args.size == "0.5b":
        big = build_random_model("qwen2.5-0.5b", args.out / "qwen2.5-0.5b")
    else:
        big = build_tiny_llama(args.out / "small", hidden=128, layers=2, heads=4)
    report["iteration"] = iteration_against_generation(args, big, args.out)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"[gpu-check] wrote {args.out / 'gpu_check.json'}", flush=True)


if __name__ == "__main__":
    main()
