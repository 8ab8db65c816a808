"""benchmarks/gpu_check.sh, the prepared GPU check, in its CPU dry run: every check runs and
passes its correctness lines (the speed targets are for a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MPIEXEC, ROOT


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "SIZE": "small", "PY": sys.executable}
    env["MPIEXEC"] = MPIEXEC
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [x for x in result.stdout.splitlines() if x.startswith("[gpu-check] ")]
    for check in ("invariance full 1/2", "invariance lowrank 1/3", "replay of the cpu run"):
        assert any(f"PASS {check}" in x for x in lines), lines
    assert sum("iteration vs batched generation" in x for x in lines) == 2
    report = json.loads(Path(tmp_path, "gpu_check.json").read_text())
    assert report["invariance"]["full"]["equal"] and report["replay"]["cpu"]["returncode"] == 0
