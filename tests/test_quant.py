"""Weight-only int8 evaluation copy: quantisation error, master untouched, a run completes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_overrides
from es_mpi.comm import Comm
from es_mpi.config import ConfigError
from es_mpi.config_load import load_config
from es_mpi.engine import Engine
from es_mpi.quant import Int8Linear, quantise_linears


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 64)
    layer = Int8Linear(linear)
    assert layer.qweight.dtype == torch.int8 and layer.scale.shape == (48,)
    err = (layer(x) - linear(x)).abs().max()
    assert 0 < err < 0.02  # rounded, but only by half a step per weight


def test_tied_linear_stays_float(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    targets = quantise_linears(model)
    assert "lm_head.weight" not in targets  # tied to the embedding
    assert any(name.endswith("q_proj.weight") for name in targets)
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_int8_engine_keeps_an_fp32_master_and_trains(tiny_model_dir, tmp_path):
    from es_mpi.session import start_run

    # conciseness: a length reward, so members of a random model score differently
    int8 = {"model.eval_dtype": "int8", "task.name": "conciseness", "es.sigma": 0.3}
    cfg = load_config(None, small_overrides(tiny_model_dir, **int8))
    engine = Engine.load(cfg, Comm.serial())
    fp32 = Engine.load(load_config(None, small_overrides(tiny_model_dir)), Comm.serial())
    assert engine.weights.checksum() == fp32.weights.checksum()  # master = file weights
    weights = start_run(cfg, tmp_path / "run", False, Comm.serial())
    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert weights.checksum() != fp32.weights.checksum()  # it moved


def test_int8_needs_full_mode(tiny_model_dir):
    with pytest.raises(ConfigError, match="model.eval_dtype"):
        load_config(
            None,
            small_overrides(tiny_model_dir, **{"model.eval_dtype": "int8", "es.mode": "lowrank"}),
        )
