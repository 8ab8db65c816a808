"""Tiny fixtures shared by every test layer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MPIEXEC = str(VENV_BIN / "mpiexec") if (VENV_BIN / "mpiexec").exists() else "mpiexec"


def small_overrides(model_dir: Path, **extra) -> list[str]:
    """Config of a run that takes about a second per process on the tiny test model."""
    settings = {
        "model.path": str(model_dir),
        "es.population": 5,
        "es.iterations": 4,
        "es.sigma": 0.2,  # large enough that the tiny random model's members score apart
        "es.alpha": 0.02,
        "task.prompts_per_member": 4,
        "task.max_new_tokens": 3,
        "task.arithmetic.digits": 1,
        "task.train_size": 50,
        "task.test_size": 10,
        "checkpoint.every": 2,
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def write_config(path: Path, overrides: list[str]) -> Path:
    """A YAML config file holding `key=value` overrides (dotted keys become sections)."""
    import yaml

    tree: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(tree))
    return path


def run_cli(args: list[str], ranks: int = 0, timeout: float = 180, **kwargs):
    """The real CLI in a subprocess; under `mpiexec -n ranks` when ranks > 0."""
    cmd = [sys.executable, "-m", "es_mpi", *args]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random Llama with the char tokenizer (built once per session)."""
    from es_mpi.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("model") / "tiny", hidden=32, layers=2, heads=2)


@pytest.fixture
def tiny_config(tiny_model_dir):
    from es_mpi.config_load import load_config

    return load_config(None, small_overrides(tiny_model_dir))
