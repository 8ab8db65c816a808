"""Noise streams and the update, against independent computations."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from es_mpi.noise import NoiseSource, tensor_stream_seed
from es_mpi.perturb import MasterWeights
from es_mpi.strategy import member_population, update_coefficients


def _digest_in_fresh_process(seed: int, name: str) -> str:
    code = (
        "import hashlib, torch; from es_mpi.noise import NoiseSource;"
        f"t = NoiseSource().sample({seed}, {name!r}, (64, 33), 'cpu');"
        "print(hashlib.sha256(t.numpy().tobytes()).hexdigest())"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_same_seed_and_tensor_give_same_noise_in_two_processes():
    assert _digest_in_fresh_process(123, "layers.0.q.weight") == _digest_in_fresh_process(
        123, "layers.0.q.weight"
    )
    assert _digest_in_fresh_process(123, "layers.0.q.weight") != _digest_in_fresh_process(
        124, "layers.0.q.weight"
    )


def test_same_shaped_tensors_get_different_noise():
    src = NoiseSource()
    a = src.sample(5, "model.layers.0.mlp.up_proj.weight", (16, 16), "cpu")
    b = src.sample(5, "model.layers.1.mlp.up_proj.weight", (16, 16), "cpu")
    assert not torch.equal(a, b)
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.3
    assert tensor_stream_seed(5, "x") != tensor_stream_seed(5, "y")


def test_noise_is_standard_normal():
    eps = NoiseSource().sample(9, "w", (200_000,), "cpu")
    assert abs(eps.mean().item()) < 0.01 and abs(eps.std().item() - 1.0) < 0.01


class TwoTensors(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        self.b = nn.Parameter(torch.tensor([0.5, -0.5, 0.25]))


def test_update_equals_hand_computation():
    weights = MasterWeights(TwoTensors())
    pop = member_population(3, 0, 4, antithetic=False)
    shaped = np.array([1.0, -0.5, 0.0, 2.0])
    alpha = 0.1
    expected = {}
    for name, start in (
        ("a", torch.tensor([[1.0, 2.0], [3.0, 4.0]])),
        ("b", torch.tensor([0.5, -0.5, 0.25])),
    ):
        total = torch.zeros_like(start, dtype=torch.float64)
        for seed, z in zip(pop.seeds.tolist(), shaped.tolist(), strict=True):
            total += (
                (alpha / 4)
                * z
                * NoiseSource().sample(seed, name, start.shape, "cpu", chunk=0).double()
            )
        expected[name] = start.double() + total
    weights.apply_update(update_coefficients(pop, shaped, alpha))
    for name in ("a", "b"):
        assert weights.master[name].dtype == torch.float32
        torch.testing.assert_close(weights.master[name].double(), expected[name], atol=1e-6, rtol=0)


def test_materialise_is_master_plus_sigma_noise():
    model = TwoTensors()
    weights = MasterWeights(model)
    weights.materialise(member_seed=77, sign=-1, sigma=0.01)
    eps = NoiseSource().sample(77, "a", (2, 2), "cpu", chunk=0)
    torch.testing.assert_close(model.a.data, weights.master["a"] - 0.01 * eps)


def test_noise_cache_changes_nothing_but_speed():
    """Noise kept from evaluation for the update equals noise generated again, bit for bit."""
    pop = member_population(4, 0, 6, antithetic=True)
    shaped = np.array([0.5, -1.0, 2.0, 0.25, -0.75, 1.5])
    results = []
    for cache_bytes in (0, 10**9, 4 * 7 * 2):  # none, all members, room for about one
        model = TwoTensors()
        weights = MasterWeights(model, noise_cache_bytes=cache_bytes)
        for seed, sign in zip(pop.seeds.tolist(), pop.signs.tolist(), strict=True):
            weights.materialise(seed, sign, sigma=0.1)
        weights.apply_update(update_coefficients(pop, shaped, alpha=0.3))
        results.append(weights.checksum())
        assert not weights._cache  # emptied by the update
    assert results[0] == results[1] == results[2]


def test_per_tensor_scale_multiplies_sigma_and_alpha():
    from es_mpi.perturb import per_tensor_std

    model = TwoTensors()
    weights = MasterWeights(model)
    weights.scales = per_tensor_std(weights.master)
    assert weights.scales["a"] == pytest.approx(float(torch.tensor([1.0, 2, 3, 4]).double().std()))
    weights.materialise(member_seed=5, sign=1, sigma=0.1)
    eps_a = NoiseSource().sample(5, "a", (2, 2), "cpu", chunk=0)
    torch.testing.assert_close(
        model.a.data, weights.master["a"] + 0.1 * weights.scales["a"] * eps_a
    )
    before = weights.master["b"].clone()
    weights.apply_update([(5, 0.5)])
    eps_b = NoiseSource().sample(5, "b", (3,), "cpu", chunk=0)
    torch.testing.assert_close(weights.master["b"], before + weights.scales["b"] * 0.5 * eps_b)


def test_per_tensor_std_is_exact_whatever_the_summation_order():
    """Exact integer sums: the std does not change when the elements are permuted (a float64
    sum's last bits do for these heavy-tailed values, seed 0), and it is the tensor's std to
    1e-5 (the grid is 2^-20 of the largest value)."""
    from es_mpi.perturb import per_tensor_std

    generator = torch.Generator().manual_seed(0)
    t = torch.randn(1_000_003, generator=generator)
    t *= torch.exp(4 * torch.randn(t.numel(), generator=generator))  # magnitudes over 1e-5..1e5
    permuted = t[torch.randperm(t.numel(), generator=generator)]
    got = per_tensor_std({"w": t})["w"]
    assert got == per_tensor_std({"w": permuted})["w"]
    assert got == pytest.approx(float(t.double().std()), rel=1e-5)
    tiny = torch.randn(1000, generator=generator) * 1e-36  # 2^-q beyond float32's range
    assert per_tensor_std({"w": tiny})["w"] == pytest.approx(float(tiny.double().std()), rel=1e-5)
    assert per_tensor_std({"one": torch.tensor([-0.5])}) == {"one": 0.5}
    assert per_tensor_std({"zeros": torch.zeros(4)}) == {"zeros": 0.0}


def test_sigma_scales_logged_or_derived_from_the_base():
    from es_mpi.config_load import load_config
    from es_mpi.perturb import per_tensor_std
    from es_mpi.runlog import LogData
    from es_mpi.update import sigma_scales

    weights = MasterWeights(TwoTensors())
    scaled = load_config(None, ["es.sigma_scale=per_tensor_std"])
    empty = LogData({}, {}, [], {})
    assert sigma_scales(scaled, weights, empty) == per_tensor_std(weights.master)
    assert sigma_scales(load_config(None, []), weights) == {"a": 1.0, "b": 1.0}
    logged = LogData({"sigma_scales": '{"a": 2.0, "b": 3.0}'}, {}, [], {})
    assert sigma_scales(scaled, weights, logged) == {"a": 2.0, "b": 3.0}


def test_scale_multipliers_first_matching_pair_applies():
    from es_mpi.config_load import load_config
    from es_mpi.update import sigma_scales

    weights = MasterWeights(TwoTensors())

    def scales(*overrides: str) -> dict[str, float]:
        return sigma_scales(load_config(None, list(overrides)), weights)

    assert scales("es.scale_multipliers=b=10") == {"a": 1.0, "b": 10.0}
    assert scales("es.scale_multipliers=a=0.5, [ab]=3") == {"a": 0.5, "b": 3.0}
    assert scales("es.scale_multipliers=b=10", "es.perturb_only=b") == {"a": 0.0, "b": 10.0}
    assert scales("es.scale_multipliers=") == {"a": 1.0, "b": 1.0}


@pytest.mark.parametrize("bad", ["norm", "=2", "norm=-1", "norm=x", "(=2", "norm=nan"])
def test_scale_multipliers_rejects_bad_pairs(bad):
    from es_mpi.config import ConfigError
    from es_mpi.config_load import load_config

    with pytest.raises(ConfigError, match="es.scale_multipliers"):
        load_config(None, [f"es.scale_multipliers={bad}"])
