"""Real-size machinery on small tensors: chunked noise, fingerprints, streamed safetensors,
fused weight storage, and logs written before these kinds existed (tests/data)."""

from __future__ import annotations

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import ROOT, run_cli
from es_mpi import tensorfile
from es_mpi.fingerprint import ROW_WORDS, fingerprint
from es_mpi.noise import CHUNK_ELEMENTS, NoiseSource, pieces
from es_mpi.perturb import MasterWeights

LEGACY = ROOT / "tests" / "data" / "legacy-runlog-1"  # format 1: tensor noise, sha256
LEGACY_2 = ROOT / "tests" / "data" / "legacy-runlog-2"  # format 2: chunked noise, sums


class Big(nn.Module):
    """One tensor of three noise chunks (enough for two lanes) and a small one."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2 * CHUNK_ELEMENTS + 1000, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(7, dtype=dtype))


def _master(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(2 * CHUNK_ELEMENTS + 1000, generator=g),
        "b": torch.randn(7, generator=g),
    }


def _chunked_noise(seed: int, name: str, numel: int, kind: str = "chunked") -> torch.Tensor:
    """The noise of a tensor (chunked or counter kind), built chunk by chunk from its
    definition."""
    src = NoiseSource("cpu", kind)
    return torch.cat(
        [
            src.sample(seed, name, (stop - start,), "cpu", chunk=k)
            for start, stop, k in pieces(numel, kind)
        ]
    )


def test_pieces_cover_a_tensor_in_order():
    assert pieces(10, "tensor") == [(0, 10, None)]
    n = 2 * CHUNK_ELEMENTS + 5
    assert pieces(n, "chunked") == [
        (0, CHUNK_ELEMENTS, 0),
        (CHUNK_ELEMENTS, 2 * CHUNK_ELEMENTS, 1),
        (2 * CHUNK_ELEMENTS, n, 2),
    ]


@pytest.mark.parametrize("kind, lanes", [("chunked", 1), ("chunked", 2), ("counter", 2)])
def test_chunked_materialise_and_update_follow_the_definition(kind, lanes):
    """Materialise and update over three chunks equal the noise built from its definition,
    bit for bit, with one lane or two (chunked: fused multiply-adds; counter: each product
    and sum rounded on its own, and torch's own threads instead of lanes)."""
    model = Big()
    weights = MasterWeights(model, _master(), noise_kind=kind, lanes=lanes)
    assert len(weights._lanes) == (lanes if kind == "chunked" else 1)  # the path that runs
    eps_w = _chunked_noise(11, "w", model.w.numel(), kind)
    weights.materialise(11, -1, 0.5)
    assert torch.equal(model.w.data, torch.add(_master()["w"], eps_w, alpha=-0.5))
    weights.apply_update([(11, 0.25), (12, -0.5)])
    eps_12 = _chunked_noise(12, "w", model.w.numel(), kind)
    if kind == "chunked":
        acc = torch.zeros_like(eps_w).add_(eps_w, alpha=0.25).add_(eps_12, alpha=-0.5)
    else:
        acc = torch.zeros_like(eps_w).add_(eps_w * 0.25).add_(eps_12 * -0.5)
    assert torch.equal(weights.master["w"], _master()["w"].add_(acc))
    assert weights.update_norm_ratio > 0


def test_bf16_target_is_the_fp32_sum_rounded_once():
    model = Big(torch.bfloat16)
    weights = MasterWeights(model, _master(), noise_kind="chunked", lanes=2)
    weights.materialise(3, 1, 0.1)
    eps = _chunked_noise(3, "w", model.w.numel())
    assert torch.equal(model.w.data, torch.add(_master()["w"], eps, alpha=0.1).to(torch.bfloat16))


def test_fingerprint_sees_every_bit_and_every_row():
    tensors = _master()
    base = fingerprint(tensors, "sums")
    assert fingerprint({k: v.clone() for k, v in tensors.items()}, "sums") == base
    words = tensors["w"].view(torch.int32)
    rng = np.random.default_rng(0)
    for index, bit in zip(rng.integers(0, words.numel(), 20), rng.integers(0, 32, 20), strict=True):
        changed = words.clone()
        changed[index] ^= torch.tensor(1 << int(bit), dtype=torch.int64).to(torch.int32)
        assert fingerprint({"w": changed.view(torch.float32), "b": tensors["b"]}, "sums") != base
    swapped = tensors["w"].clone()  # two values trade places across rows: S0 equal, S1 not
    swapped[[5, 3 * ROW_WORDS + 1]] = swapped[[3 * ROW_WORDS + 1, 5]]
    assert fingerprint({"w": swapped, "b": tensors["b"]}, "sums") != base
    renamed = {"w2": tensors["w"], "b": tensors["b"]}
    assert fingerprint(renamed, "sums") != base


def test_fingerprint_does_not_depend_on_threads():
    tensors = _master()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fingerprint(tensors, "sums")
        torch.set_num_threads(2)
        assert fingerprint(tensors, "sums") == one
    finally:
        torch.set_num_threads(threads)


def test_sha256_kind_is_the_older_checksum():
    """Kind sha256 = sha256 over 'name:shape;' and the fp32 bytes, in name order."""
    tensors = {"b": torch.randn(3), "a": torch.randn(2, 2)}
    h = hashlib.sha256()
    for name in ("a", "b"):
        h.update(f"{name}:{tuple(tensors[name].shape)};".encode())
        h.update(tensors[name].numpy().tobytes())
    assert fingerprint(tensors, "sha256") == h.hexdigest()


@pytest.mark.parametrize("kind", ["sums", "sha256"])
def test_streamed_file_fingerprint_equals_the_tensors(tmp_path, kind):
    tensors = _master()
    path = tmp_path / "x.safetensors"
    tensorfile.write(path, tensors, {"k": "v"})
    assert tensorfile.file_fingerprint(path, kind) == fingerprint(tensors, kind)
    loaded = load_file(str(path))  # an ordinary safetensors file
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert tensorfile.read_header(path)[1] == {"k": "v"}


def test_streamed_read_converts_and_checks(tmp_path):
    tensors = _master()
    path = tmp_path / "x.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(path))
    out = {k: torch.empty_like(v) for k, v in tensors.items()}
    tensorfile.read_into(path, out)  # bf16 file into fp32 tensors
    assert all(torch.equal(out[k], tensors[k].to(torch.bfloat16).float()) for k in tensors)
    tensorfile.write(tmp_path / "y.safetensors", tensors, dtype=torch.bfloat16)
    assert torch.equal(load_file(str(tmp_path / "y.safetensors"))["w"], tensors["w"].bfloat16())
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        tensorfile.read_into(tmp_path / "cut.safetensors", out)
    with pytest.raises(ValueError, match="shape"):
        tensorfile.read_into(path, {"b": torch.empty(8)})


def test_fused_storage_is_read_without_a_copy():
    from es_mpi.decode import _fused, _Layer, fuse_weight_storage
    from es_mpi.modelio import load_model

    model = load_model(ROOT / "models" / "qwen2-tiny-chat", "float32", torch.device("cpu"))
    attn = model.model.layers[0].self_attn
    before = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).clone()
    assert (
        _fused([attn.q_proj.weight, attn.k_proj.weight]).data_ptr() != attn.q_proj.weight.data_ptr()
    )
    fuse_weight_storage(model)
    names = {id(p): name for name, p in model.named_parameters()}
    qkv = _Layer(model.model.layers[0], names).qkv.weight
    assert qkv.data_ptr() == attn.q_proj.weight.data_ptr() and torch.equal(qkv, before)
    attn.k_proj.weight.data.add_(1.0)  # writes through the parameter reach the fused view
    qkv = _Layer(model.model.layers[0], names).qkv.weight
    assert torch.equal(qkv[attn.q_proj.weight.shape[0]], attn.k_proj.weight[0])


def test_new_logs_name_their_kinds(tmp_path, tiny_model_dir):
    from conftest import small_overrides

    args = ["train", "--run-dir", str(tmp_path / "run")]
    for item in small_overrides(tiny_model_dir, **{"es.iterations": 2}):
        args += ["--set", item]
    assert run_cli(args).returncode == 0
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert f.attrs["log_version"] == 3
        assert f.attrs["noise"] == "counter" and f.attrs["fingerprint"] == "sums"
        assert np.all(f["time_fingerprint"][:] >= 0)
        session = json.loads(f.attrs["sessions"])[0]
    ((device, ranks),) = session["devices"].items()  # every rank's device, counted
    assert device.startswith("cpu ") and ranks == 1
    assert session["software"]["torch"] == torch.__version__


@pytest.mark.parametrize("mode", ["full", "lowrank"])
@pytest.mark.parametrize(
    "legacy, noise, kind",
    [(LEGACY, None, "sha256"), (LEGACY_2, "chunked", "sums")],
    ids=["format-1", "format-2"],
)
def test_an_older_log_still_replays(tmp_path, mode, legacy, noise, kind):
    """Format 1: whole-tensor noise and sha256 checksums; format 2: torch-generator chunks
    and fused updates (tests/data/legacy-runlog-*)."""
    out = tmp_path / "replayed"
    result = run_cli(["replay", "--run-dir", str(legacy / mode), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    with h5py.File(legacy / mode / "run.h5", "r") as f:
        assert f.attrs.get("noise") == noise
        last = f["checksum"][-1].decode()
    assert fingerprint(load_file(str(out / "model.safetensors")), kind) == last


@pytest.mark.parametrize(
    "legacy, kind, checkpoint",
    [(LEGACY, "sha256", 6), (LEGACY_2, "sums", 6)],
    ids=["format-1", "format-2"],
)
def test_an_older_log_resumes_in_its_own_kinds(tmp_path, legacy, kind, checkpoint):
    run_dir = tmp_path / "full"
    shutil.copytree(legacy / "full", run_dir)
    with h5py.File(run_dir / "run.h5", "r") as f:
        noise = f.attrs.get("noise")
    result = run_cli(["resume", "--run-dir", str(run_dir), "--iterations", "8"])
    assert result.returncode == 0, result.stderr
    assert f"(checkpoint {checkpoint}," in result.stdout  # its fingerprint matched the log's
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["iterations_done"] == 8 and f.attrs.get("noise") == noise
        last = f["checksum"][-1].decode()
    assert fingerprint(load_file(str(run_dir / "final" / "model.safetensors")), kind) == last
    replayed = run_cli(["replay", "--run-dir", str(run_dir), "--out", str(tmp_path / "r")])
    assert replayed.returncode == 0, replayed.stderr


def test_kl_base_copy_is_the_base_in_the_evaluation_dtype():
    """Built from the evaluation copy's structure and the weight files: the base model's
    values, in bfloat16, and independent of the (perturbed) evaluation copy."""
    from es_mpi.comm import Comm
    from es_mpi.config_load import load_config
    from es_mpi.engine import Engine
    from es_mpi.modelio import load_model

    path = ROOT / "models" / "qwen2-tiny-chat"
    cfg = load_config(None, [f"model.path={path}", "model.eval_dtype=bfloat16"])
    engine = Engine.load(cfg, Comm.serial())
    engine.weights.materialise(5, 1, 0.5)
    base = engine.load_base_copy()
    fresh = dict(load_model(path, "bfloat16", torch.device("cpu")).named_parameters())
    for name, p in base.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, fresh[name])
        assert p.data_ptr() != engine.model.get_parameter(name).data_ptr()
    assert not torch.equal(base.model.embed_tokens.weight, engine.model.model.embed_tokens.weight)
