"""End-to-end runs of the real CLI: rank-count invariance, replay, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import h5py
import pytest
from safetensors.torch import load_file

from conftest import MPIEXEC, run_cli, small_overrides
from es_mpi.perturb import weights_checksum
from scenarios import run_until

pytestmark = pytest.mark.slow


def _train_args(run_dir: Path, model_dir: Path, **extra) -> list[str]:
    args = ["train", "--run-dir", str(run_dir)]
    for item in small_overrides(model_dir, **extra):
        args += ["--set", item]
    return args


def _final_sha(run_dir: Path) -> str:
    return weights_checksum(load_file(str(run_dir / "final" / "model.safetensors")))


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    result = run_cli(_train_args(run_dir, tiny_model_dir))
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.parametrize("ranks", [2, 3])
def test_rank_count_invariance(reference_run, tiny_model_dir, tmp_path, ranks):
    """Population 5 does not divide over 2 or 3 ranks: the result must not care."""
    run_dir = tmp_path / "run"
    result = run_cli(_train_args(run_dir, tiny_model_dir), ranks=ranks)
    assert result.returncode == 0, result.stderr
    assert _final_sha(run_dir) == _final_sha(reference_run)
    # the run actually moved the weights away from the base model
    assert _final_sha(run_dir) != weights_checksum(
        load_file(str(tiny_model_dir / "model.safetensors"))
    )


def test_replay_equals_final_bit_for_bit(reference_run, tmp_path):
    out = tmp_path / "replayed"
    result = run_cli(["replay", "--run-dir", str(reference_run), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    final = load_file(str(reference_run / "final" / "model.safetensors"))
    replayed = load_file(str(out / "model.safetensors"))
    assert final.keys() == replayed.keys()
    assert all(final[k].equal(replayed[k]) for k in final)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers loads it


def test_tampered_log_fails_naming_the_iteration(reference_run, tmp_path):
    import shutil

    run_dir = tmp_path / "tampered"
    shutil.copytree(reference_run, run_dir)
    with h5py.File(run_dir / "run.h5", "a") as f:
        rewards = f["rewards"][2]
        rewards[0], rewards[1] = rewards.max() + 1.0, rewards.min() - 1.0  # other shaped weights
        f["rewards"][2] = rewards
    result = run_cli(["replay", "--run-dir", str(run_dir), "--out", str(tmp_path / "out")])
    assert result.returncode == 3
    assert "iteration 2" in result.stderr
    assert not (tmp_path / "out").exists()


def test_resume_after_sigkill_is_bit_identical(tiny_model_dir, tmp_path):
    extra = {"es.iterations": 12, "checkpoint.every": 3}
    full = tmp_path / "full"
    assert run_cli(_train_args(full, tiny_model_dir, **extra)).returncode == 0

    killed = tmp_path / "killed"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "es_mpi"]
    cmd += _train_args(killed, tiny_model_dir, **extra)
    run_until(cmd, "it 7/", lambda proc: os.killpg(proc.pid, signal.SIGKILL))
    done = run_cli(["inspect", "--run-dir", str(killed), "--json"])
    assert done.returncode == 0, done.stderr
    assert not (killed / "final").exists()

    resumed = run_cli(["resume", "--run-dir", str(killed)], ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at iteration" in resumed.stdout
    assert _final_sha(killed) == _final_sha(full)
    with h5py.File(killed / "run.h5", "r") as f:
        assert list(f["iteration"][:]) == list(range(12))  # the counter continued
    shown = run_cli(["inspect", "--run-dir", str(killed)])
    assert shown.returncode == 0, shown.stderr
    assert "train from 0 on 2 rank(s); resume from " in shown.stdout
    assert "ok: 12 committed iterations" in shown.stdout


def test_failure_on_one_rank_aborts_the_job(tiny_model_dir, tmp_path):
    """A task whose scorer raises on rank 1 only: the job must end, naming the rank."""
    args = _train_args(
        tmp_path / "run", tiny_model_dir, **{"task.name": "failing_task:FailOnRankOne"}
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent / "plugins")}
    start = time.monotonic()
    result = run_cli(args, ranks=2, timeout=60, env=env)
    assert result.returncode != 0
    assert "rank 1 failed" in result.stderr and "boom on rank 1" in result.stderr
    assert time.monotonic() - start < 60


def test_replay_and_invariance_with_scaled_sigma_and_mirrored_pairs(tiny_model_dir, tmp_path):
    """Per-tensor sigma scales come from the log and the alpha schedule from the config, so
    replay repeats them; 2 ranks agree (also under a sigma schedule)."""
    extra = {
        "es.sigma_schedule": "linear",
        "es.sigma_decay_iterations": 3,
        "es.sigma_final": 0.4,
        "es.alpha_schedule": "cosine",
        "es.alpha_decay_iterations": 2,
        "es.alpha_final": 0.3,
        "es.sigma_scale": "per_tensor_std",
        "es.antithetic": "true",
        "es.population": 6,
        "es.sigma": 0.5,
        "es.alpha": 0.2,
        "es.shaping": "centered_rank",
    }
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(_train_args(one, tiny_model_dir, **extra)).returncode == 0
    trained = run_cli(_train_args(two, tiny_model_dir, **extra), ranks=2)
    assert trained.returncode == 0
    assert _final_sha(one) == _final_sha(two)
    # the log and the progress lines carry each iteration's scheduled alpha and sigma
    with h5py.File(two / "run.h5", "r") as f:
        assert f["sigma"][:] == pytest.approx([0.5, 0.4, 0.3, 0.2])  # linear, 0.4x over 3
        assert f["alpha"][:] == pytest.approx([0.2, 0.13, 0.06, 0.06])  # cosine, 0.3x over 2
    assert "it 2/4 reward" in trained.stdout and "alpha 0.13 sigma 0.4 " in trained.stdout
    result = run_cli(["replay", "--run-dir", str(two), "--out", str(tmp_path / "replayed")])
    assert result.returncode == 0, result.stderr
    assert weights_checksum(
        load_file(str(tmp_path / "replayed" / "model.safetensors"))
    ) == _final_sha(two)
    inspected = run_cli(["inspect", "--run-dir", str(two), "--json"])
    es_line = json.loads(inspected.stdout)["es"]
    assert "centered_rank" in es_line and "alpha cosine to 0.3x over 2 its" in es_line
    assert "sigma linear to 0.4x over 3 its" in es_line


def test_time_limit_stops_resumably_and_resume_continues(tiny_model_dir, tmp_path):
    """A stop at the time limit is exit 75 with a checkpoint and no final/; only the
    session that does the last iteration writes final/."""
    run_dir = tmp_path / "run"
    limited = _train_args(run_dir, tiny_model_dir, **{"runtime.time_limit_minutes": 0.0001})
    result = run_cli(limited, ranks=2)
    assert result.returncode == 75, result.stderr
    assert "time limit: stopped after iteration 1 of 4" in result.stdout
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert int(f.attrs["iterations_done"]) == 1  # a session runs at least one iteration
    assert not (run_dir / "final").exists()
    assert (run_dir / "checkpoints").is_dir()
    assert run_cli(["resume", "--run-dir", str(run_dir)]).returncode == 75  # the limit holds
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert int(f.attrs["iterations_done"]) == 2
    lifted = ["resume", "--run-dir", str(run_dir), "--set", "runtime.time_limit_minutes=0"]
    assert run_cli(lifted).returncode == 0
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert int(f.attrs["iterations_done"]) == 4
    assert (run_dir / "final" / "model.safetensors").is_file()
    refused = run_cli(["resume", "--run-dir", str(run_dir), "--set", "es.sigma=1"])
    assert refused.returncode == 2 and "es.sigma" in refused.stderr


def test_job_end_stops_with_the_margin_and_resume_finishes(tiny_model_dir, tmp_path):
    """ES_MPI_JOB_END (set by the job scripts from the scheduler) less
    runtime.stop_margin_seconds is a deadline: exit 75 before it, resumable."""
    run_dir = tmp_path / "run"
    args = _train_args(run_dir, tiny_model_dir, **{"runtime.stop_margin_seconds": 3600})
    env = {**os.environ, "ES_MPI_JOB_END": str(time.time() + 60)}
    result = run_cli(args, ranks=2, env=env)
    assert result.returncode == 75, result.stderr
    assert "job end: stopped after iteration 1" in result.stdout
    assert run_cli(["resume", "--run-dir", str(run_dir)], ranks=2).returncode == 0
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert int(f.attrs["iterations_done"]) == 4


def test_lowrank_batched_invariance_replay_and_resume(tiny_model_dir, tmp_path):
    """Low rank, groups of 2 members, per-tensor sigma, pairs, perturbed vectors: 1 rank and
    3 ranks agree bit for bit; replay repeats it; a run stopped after 2 iterations and
    resumed on 2 ranks ends identical."""
    extra = {
        "es.mode": "lowrank",
        "es.rank": 2,
        "es.members_per_batch": 2,
        "es.lowrank_vectors": "full",
        "es.sigma_scale": "per_tensor_std",
        "es.antithetic": "true",
        "es.population": 6,
        "es.sigma": 0.5,
        "es.alpha": 0.2,
    }
    one, three = tmp_path / "one", tmp_path / "three"
    assert run_cli(_train_args(one, tiny_model_dir, **extra)).returncode == 0
    result = run_cli(_train_args(three, tiny_model_dir, **extra), ranks=3)
    assert result.returncode == 0, result.stderr
    assert _final_sha(one) == _final_sha(three)
    result = run_cli(["replay", "--run-dir", str(three), "--out", str(tmp_path / "replayed")])
    assert result.returncode == 0, result.stderr
    replayed = load_file(str(tmp_path / "replayed" / "model.safetensors"))
    assert weights_checksum(replayed) == _final_sha(one)

    part = tmp_path / "part"
    short = _train_args(part, tiny_model_dir, **{**extra, "es.iterations": 2})
    assert run_cli(short).returncode == 0
    result = run_cli(["resume", "--run-dir", str(part), "--iterations", "4"], ranks=2)
    assert result.returncode == 0, result.stderr
    assert _final_sha(part) == _final_sha(one)


@pytest.mark.parametrize(
    ("config", "model", "new_tokens"),
    [
        ("configs/countdown-chat.yaml", "qwen2-countdown-chat", 24),  # 2 end ids, fast decoder
        ("configs/paper/conciseness.yaml", "gemma3-tiny-chat", 10),  # chat, hf, bf16 copy
    ],
)
def test_chat_configs_are_rank_count_invariant(tmp_path, config, model, new_tokens):
    """Chat prompts, multiple end ids and each decoder: 2 ranks give 1 rank's weights (a
    reward that varies between members, so the weights move)."""
    sets = [
        f"model.path=models/{model}",
        "es.population=4",
        "es.iterations=2",
        "task.prompts_per_member=8",
        f"task.max_new_tokens={new_tokens}",
        "task.train_size=12",
        "task.test_size=4",
        "task.eval_batch=4",
    ]
    args = ["train", "--config", config]
    for item in sets:
        args += ["--set", item]
    shas = []
    for ranks in (1, 2):
        run_dir = tmp_path / f"run{ranks}"
        result = run_cli([*args, "--run-dir", str(run_dir)], ranks=ranks)
        assert result.returncode == 0, result.stderr
        shas.append(_final_sha(run_dir))
    assert shas[0] == shas[1]
    assert shas[0] != weights_checksum(load_file(str(Path("models") / model / "model.safetensors")))
