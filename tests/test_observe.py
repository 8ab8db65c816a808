"""Seeing a run: progress lines, logged metrics, plot, inspect, export."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, small_overrides
from es_mpi.evaluate import HeldoutScore
from es_mpi.fingerprint import fingerprint
from es_mpi.progress import Progress, format_seconds
from es_mpi.runlog import IterationRecord


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("observe") / "run"
    args = ["train", "--run-dir", str(run_dir)]
    for item in small_overrides(tiny_model_dir, **{"es.iterations": 6, "task.eval_every": 3}):
        args += ["--set", item]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr
    return run_dir, result.stdout


def _record(iteration: int) -> IterationRecord:
    rewards = np.array([0.1, 0.3, 0.2])
    times = {"iteration": 2.0, "evaluate": 1.5}
    return IterationRecord(iteration, np.arange(3), np.ones(3), rewards, rewards, "x", times)


def test_batch_job_progress_is_one_line_per_iteration_with_eta(capsys):
    progress = Progress(total=10, start=0, bar=False)
    progress.iteration(_record(0))
    progress.iteration(_record(1), HeldoutScore(0.5, 0.25))
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[es-mpi] it 1/10 reward 0.2000 max 0.3000 | 2.00 s/it ETA 0m18s"
    assert lines[1] == (
        "[es-mpi] it 2/10 reward 0.2000 max 0.3000 held-out 25.0% | 2.00 s/it ETA 0m16s"
    )
    assert format_seconds(3725) == "1h02m"


def test_terminal_progress_uses_a_bar(capsys):
    progress = Progress(total=3, start=1, bar=True)
    progress.iteration(_record(1))
    progress.close()
    captured = capsys.readouterr()
    assert "[es-mpi] it" not in captured.out and "2/3" in captured.err


def test_run_log_holds_the_metrics(finished_run):
    run_dir, stdout = finished_run
    with h5py.File(run_dir / "run.h5", "r") as f:
        moved = np.any(f["shaped"][:] != 0, axis=1)  # all-equal rewards: no update at all
        ratio = f["update_norm_ratio"][:]
        assert moved.any() and np.all((ratio > 0) == moved) and np.all(ratio < 1)
        assert np.all(f["tokens_per_second"][:] > 0)
        assert np.allclose(f["reward_std"][:], f["rewards"][:].std(axis=1))
        assert np.all(f["shaped_max"][:] >= f["shaped_min"][:])
        overhead = json.loads(f.attrs["logging_overhead"])
    assert overhead["iterations"] == 6 and overhead["median_seconds"] > 0
    assert "it 3/6 reward" in stdout and "it 6/6 reward" in stdout


def test_plot_writes_a_png_for_several_runs(finished_run, tmp_path):
    run_dir, _ = finished_run
    out = tmp_path / "cmp.png"
    result = run_cli(
        ["plot", "--run-dir", str(run_dir), "--run-dir", str(run_dir), "--out", str(out)]
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_export_rebuilds_any_iteration(finished_run, tmp_path):
    run_dir, _ = finished_run
    with h5py.File(run_dir / "run.h5", "r") as f:
        checksums = [c.decode() for c in f["checksum"][:]]
    for k in (3, 6):
        out = tmp_path / f"k{k}"
        result = run_cli(
            ["export", "--run-dir", str(run_dir), "--iteration", str(k), "--out", str(out)]
        )
        assert result.returncode == 0, result.stderr
        exported = load_file(str(out / "model.safetensors"))
        assert fingerprint(exported, "sums") == checksums[k - 1]
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert fingerprint(final, "sums") == checksums[-1]

    bf16 = tmp_path / "bf16"
    args = ["export", "--run-dir", str(run_dir), "--iteration", "4", "--out", str(bf16)]
    assert run_cli([*args, "--dtype", "bfloat16"]).returncode == 0
    from transformers import AutoModelForCausalLM

    assert all(
        t.dtype == torch.bfloat16 for t in load_file(str(bf16 / "model.safetensors")).values()
    )
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16

    bad = run_cli(["export", "--run-dir", str(run_dir), "--iteration", "99", "--out", str(bf16)])
    assert bad.returncode == 2 and "--iteration" in bad.stderr


def test_inspect_summarises(finished_run):
    run_dir, _ = finished_run
    result = run_cli(["inspect", "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stderr
    for text in (
        "heldout_best",
        "ok: 6 committed iterations, 3 held-out evaluations",
        "train from 0 on 1 rank(s)",
        "checksum ok",
    ):
        assert text in result.stdout


def test_tensorboard_missing_is_a_clear_error(tiny_model_dir, tmp_path):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    args = ["train", "--run-dir", str(tmp_path / "run"), "--tensorboard"]
    for item in small_overrides(tiny_model_dir):
        args += ["--set", item]
    result = run_cli(args)
    assert result.returncode == 2 and "runtime.tensorboard" in result.stderr
    assert not (tmp_path / "run").exists()
