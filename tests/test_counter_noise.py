"""The counter noise kind (noise.py): its definition, its distribution, and bits that do not
depend on the block size or on torch's CPU kernel set (ATEN_CPU_CAPABILITY), so that a run
replays bit for bit on another kind of processor."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli, small_overrides
from es_mpi.noise import MAG_BASE, CounterNormal, NoiseSource, checked_magnitude_table

NORMAL = statistics.NormalDist()


def definition(n: int, stream: int) -> np.ndarray:
    """The counter kind written out in numpy's uint32 arithmetic (docs/design.md)."""
    k0, k1 = np.uint32(stream & 0xFFFFFFFF), np.uint32(stream >> 32 & 0xFFFFFFFF)
    h = (np.arange(n, dtype=np.uint32) * np.uint32(0x9E3779B9) + k1) ^ k0
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        h = (h ^ (h >> np.uint32(shift))) * np.uint32(multiplier)
    h ^= h >> np.uint32(16)
    k = (h & np.uint32(0x3FFFFFFF)) * np.uint32(2) + np.uint32(1)
    index = (k.astype(np.float32).view(np.int32) >> 12) - MAG_BASE
    magnitude = checked_magnitude_table()[index]
    return np.where(h >> np.uint32(31) == 1, -magnitude, magnitude).astype(np.float32)


@pytest.mark.parametrize("stream", [0, 12345, (1 << 63) - 1, 0x9E3779B97F4A7C15 & ((1 << 63) - 1)])
def test_values_are_the_written_definition_for_any_block_size(stream):
    n = 200_003  # several CPU blocks and a ragged end
    expected = definition(n, stream).view(np.int32)
    for block in (1 << 16, 1 << 10, n):
        source = CounterNormal(torch.device("cpu"))
        source.block = block
        source.counter = torch.arange(block, dtype=torch.int32)
        source.hash, source.shifted = (
            torch.empty_like(source.counter),
            torch.empty_like(source.counter),
        )
        source.value = torch.empty(block)
        out = source.fill(torch.empty(n), stream)
        assert np.array_equal(out.numpy().view(np.int32), expected), block


def test_streams_of_other_tensors_chunks_and_members_differ():
    source = NoiseSource("cpu", "counter")
    first = source.sample(1, "w", torch.Size((1000,)), "cpu", chunk=0)
    for other in ((2, "w", 0), (1, "v", 0), (1, "w", 1)):
        assert not torch.equal(first, source.sample(other[0], other[1], (1000,), "cpu", other[2]))
    assert torch.equal(first, source.sample(1, "w", torch.Size((1000,)), "cpu", chunk=0))


def test_distribution_moments_and_tails():
    """2^25 values: mean, variance, skewness, kurtosis, and P(|x| > t) to 4.5 sigma against
    the normal distribution (each within 5 binomial standard deviations)."""
    source = NoiseSource("cpu", "counter")
    x = torch.cat([source.sample(7, "w", (1 << 22,), "cpu", chunk=c) for c in range(8)]).double()
    n = x.numel()
    assert abs(float(x.mean())) < 5 / n**0.5
    assert abs(float(x.var()) - 1) < 5 * (2 / n) ** 0.5
    centred = x - x.mean()
    assert abs(float((centred**3).mean())) < 5 * (15 / n) ** 0.5
    assert abs(float((centred**4).mean()) - 3) < 5 * (96 / n) ** 0.5
    for t in (1.0, 2.0, 3.0, 4.0, 4.5):
        p = 2 * (1 - NORMAL.cdf(t))
        count = int((x.abs() > t).sum())
        assert abs(count - n * p) < 5 * (n * p * (1 - p)) ** 0.5, (t, count, n * p)
    assert float(x.abs().max()) < 6.3  # the table's last cell


def _capabilities() -> list[str]:
    """torch's CPU kernel sets this machine can run, scalar first."""
    best = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    return order[: order.index(best) + 1] if best in order else ["default", best]


NOISE_AND_UPDATE = """
import hashlib, numpy as np, torch
from torch import nn
from es_mpi.noise import NoiseSource
from es_mpi.perturb import MasterWeights
model = nn.Linear(300, 500)  # weights from numpy: torch's initialisers differ per kernel set
rng = np.random.default_rng(0)
with torch.no_grad():
    for p in model.parameters():
        p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)))
weights = MasterWeights(model, noise_kind="counter", lanes=2)
weights.scales = {"weight": 0.7, "bias": 1.0}
weights.apply_update([(11, 0.013), (12, -0.021), (13, 0.0077)])
digest = hashlib.sha256()
for t in [*weights.master.values(), NoiseSource("cpu", "counter").sample(5, "x", (99999,), "cpu")]:
    digest.update(t.numpy().tobytes())
print(torch.backends.cpu.get_cpu_capability(), digest.hexdigest())
"""


def test_noise_and_update_bits_do_not_depend_on_the_cpu_kernel_set():
    if len(_capabilities()) < 2:
        pytest.skip("this CPU runs only torch's scalar kernels")
    digests = {}
    for capability in _capabilities():
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(ROOT / "src")}
        result = subprocess.run(
            [sys.executable, "-c", NOISE_AND_UPDATE], capture_output=True, text=True, env=env
        )
        assert result.returncode == 0, result.stderr
        used, digest = result.stdout.split()
        digests[used] = digest
    assert len(digests) == len(_capabilities()), digests  # each kernel set was used
    assert len(set(digests.values())) == 1, digests


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lowrank"])
def test_a_run_trained_with_one_kernel_set_replays_with_another(tiny_model_dir, tmp_path, mode):
    """Trained with the best kernels of this CPU, replayed with the scalar ones (as an Arm
    or older node would compute): every logged fingerprint matches."""
    extra = {"es.iterations": 3, "es.mode": mode, "runtime.threads": 2}
    extra["task.prompts_per_member"] = 16  # so that members of the random model score apart
    if mode == "lowrank":
        extra.update({"es.rank": 2, "es.members_per_batch": 2, "es.lowrank_vectors": "full"})
    args = ["train", "--run-dir", str(tmp_path / "run")]
    for item in small_overrides(tiny_model_dir, **extra):
        args += ["--set", item]
    assert run_cli(args).returncode == 0
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert f.attrs["noise"] == "counter"
        assert len({c for c in f["checksum"][:]}) > 1  # the weights moved
    scalar = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    replay = ["replay", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]
    result = run_cli(replay, env=scalar)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_pass_small_model_path_equals_the_per_tensor_path():
    """Models of at most one chunk draw a member's noise for all tensors in one pass and
    update members-outer: the same bits as the per-tensor pieces."""
    from torch import nn

    from es_mpi.perturb import MasterWeights

    def weights(one_pass: bool) -> tuple[nn.Module, MasterWeights]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(30, 40), nn.LayerNorm(40), nn.Linear(40, 7))
        w = MasterWeights(model, noise_kind="counter", noise_cache_bytes=4 * 3000)
        w._one_pass = one_pass
        w.scales = {name: (0.0 if name == "1.bias" else 0.7) for name in w.names}
        return model, w

    (model_a, a), (model_b, b) = weights(True), weights(False)
    for seed in (3, 4):  # the first is cached (budget of one member), the second is not
        a.materialise(seed, -1, 0.2)
        b.materialise(seed, -1, 0.2)
        pairs = zip(model_a.parameters(), model_b.parameters(), strict=True)
        assert all(torch.equal(pa, pb) for pa, pb in pairs)
    a.apply_update([(3, 0.5), (9, -0.25), (4, 0.125)])
    b.apply_update([(3, 0.5), (9, -0.25), (4, 0.125)])
    for name in a.names:
        assert torch.equal(a.master[name], b.master[name]), name
    assert a.update_norm_ratio == pytest.approx(b.update_norm_ratio, rel=1e-12)
