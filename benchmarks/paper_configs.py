"""Every configs/paper/*.yaml for 2 iterations on each chat fixture, under mpiexec -n 1 and
-n 2 (`make bench-paper`): exit code, seconds, whether the final weights are equal and whether
they moved from the base (a random fixture scores 0 on Countdown and multiplication, and equal
rewards make no update; the pretrained Qwen2 fixture does score).

Small --set values keep each run to seconds on a CPU; everything else (prompt format, chat
template, end ids, dtype, decoder choice, task) is the paper config's own. The paper's
Countdown file is used when present (data/countdown.json), else generated problems.
Usage: python benchmarks/paper_configs.py [--ranks 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from safetensors.torch import load_file  # noqa: E402

from es_mpi.perturb import weights_checksum  # noqa: E402

FIXTURES = ["qwen2-tiny-chat", "llama3-tiny-chat", "gemma3-tiny-chat", "qwen2-countdown-chat"]
MODEL_FILE = "model.safetensors"
SMALL = [
    "es.population=4",
    "es.iterations=2",
    "task.prompts_per_member=8",
    "task.max_new_tokens=24",
    "task.train_size=8",
    "task.test_size=4",
    "task.eval_batch=4",
    "checkpoint.every=1",
]


def small_sets(config: Path, model: str) -> list[str]:
    sets = [*SMALL, f"model.path=models/{model}"]
    data = ROOT / "data" / "countdown.json"
    if config.stem == "countdown" and not data.is_file():
        sets.append("task.countdown.data_path=")
    return sets


def train(config: Path, model: str, ranks: int, run_dir: Path) -> tuple[int, float, str]:
    venv_bin = Path(sys.executable).parent
    cmd = [str(venv_bin / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "es_mpi"]
    cmd += ["train", "--config", str(config), "--run-dir", str(run_dir)]
    for item in small_sets(config, model):
        cmd += ["--set", item]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if result.returncode:
        return result.returncode, seconds, result.stderr.strip().splitlines()[-1]
    return 0, seconds, weights_checksum(load_file(str(run_dir / "final" / MODEL_FILE)))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()
    failures = 0
    print(f"| config | model | -n 1 s | -n {args.ranks} s | final weights equal | moved |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for config in sorted((ROOT / "configs" / "paper").glob("*.yaml")):
            for model in FIXTURES:
                one = train(config, model, 1, Path(tmp) / f"{config.stem}-{model}-1")
                many = train(config, model, args.ranks, Path(tmp) / f"{config.stem}-{model}-n")
                ok = one[0] == 0 and many[0] == 0 and one[2] == many[2]
                failures += not ok
                detail = "yes" if ok else f"NO ({one[0]}: {one[2]} / {many[0]}: {many[2]})"
                base = weights_checksum(load_file(str(ROOT / "models" / model / MODEL_FILE)))
                moved = "yes" if one[2] != base else "no"
                print(
                    f"| {config.stem} | {model} | {one[1]:.1f} | {many[1]:.1f} | {detail} "
                    f"| {moved} |",
                    flush=True,
                )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
