"""ES against GRPO (benchmarks/es_vs_grpo.py) for a few seconds on the tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT, small_overrides

pytest.importorskip("trl", reason="the GRPO baseline needs TRL (make install-rl)")


def test_es_and_grpo_both_move_and_both_curves_are_written(tiny_model_dir, tmp_path):
    sets = small_overrides(
        tiny_model_dir,
        **{
            "es.population": 6,
            "es.iterations": 1000,
            "grpo.prompts_per_step": 2,
            "grpo.num_generations": 4,
        },
    )
    cmd = [sys.executable, str(ROOT / "benchmarks" / "es_vs_grpo.py"), "--minutes", "0.1"]
    cmd += ["--seeds", "0", "--eval-seconds", "2", "--out", str(tmp_path)]
    config = tmp_path / "defaults.yaml"  # the built-in defaults plus small_overrides
    config.write_text("{}\n")
    cmd += ["--config", str(config)]
    for item in sets:
        cmd += ["--set", item]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "es_vs_grpo.json").read_text())
    for method in ("es", "grpo"):
        points = record["runs"][method]["0"]
        assert len(points) >= 2 and points[0]["seconds"] == 0 and points[-1]["completions"] > 0
        assert points[-1]["seconds"] <= 6.0 + 1e-9  # cut at the training-time budget
    grpo = json.loads((tmp_path / "grpo-seed0" / "grpo.json").read_text())
    assert grpo["update_norm_ratio"] > 0
    with h5py.File(tmp_path / "es-seed0" / "run.h5", "r") as f:
        assert np.any(f["update_norm_ratio"][:] > 0)
    png = (tmp_path / "es_vs_grpo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out accuracy" in result.stdout
