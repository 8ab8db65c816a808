"""Loading and saving Hugging Face models from local directories only (no hub)."""

from __future__ import annotations

import hashlib
import json
import os
from importlib.util import find_spec
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from . import tensorfile  # noqa: E402
from .config import ConfigError  # noqa: E402
from .decode import fuse_weight_storage  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path: str | Path) -> Path:
    """The model directory, checked file by file before any rank loads it: every problem is
    a ConfigError naming model.path and the file (exit 2, no traceback)."""
    field = "config field 'model.path'"
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{field}: '{path}' is not a directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{field}: '{path}' has no config.json")
    if not sorted(path.glob("*.safetensors")):
        raise ConfigError(f"{field}: '{path}' has no *.safetensors weights")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            try:
                json.loads(file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{field}: '{file}' is not valid JSON ({exc})") from exc
    try:
        model_class(path)
    except (KeyError, ValueError, OSError) as exc:
        raise ConfigError(
            f"{field}: '{path / 'config.json'}' is not a causal LM transformers knows ({exc})"
        ) from exc
    return path


def check_tokenizer(path: str | Path):
    """The model directory's tokenizer, or a ConfigError naming the directory."""
    try:
        return load_tokenizer(path)
    except Exception as exc:  # tokenizers/transformers raise many types on a bad file
        raise ConfigError(
            f"config field 'model.path': cannot load a tokenizer from '{path}' "
            f"(tokenizer.json / tokenizer_config.json): {exc}"
        ) from exc


def model_sha256(path: str | Path) -> str:
    """Identity of a base model: sha256 over its *.safetensors files in name order."""
    h = hashlib.sha256()
    for file in sorted(Path(path).glob("*.safetensors")):
        h.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def model_class(path: str | Path):
    """The model's class, imported now (transformers imports architectures lazily)."""
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], config


def load_model(
    path: str | Path, dtype: str, device: torch.device, cls=None, config=None, fuse: bool = False
):
    """The model at `path` in `dtype` on `device`, in memory of its own (not views of the
    weights file). `fuse`: q/k/v and gate/up share one storage each (decode.py)."""
    if cls is None:
        cls, config = model_class(path)
    # device_map (needs accelerate): the weights go from the file straight to their device
    # in their dtype; without accelerate they pass through host memory once.
    placement = {"device_map": {"": str(device)}} if find_spec("accelerate") else {}
    model = cls.from_pretrained(
        str(path), config=config, dtype=DTYPES[dtype], local_files_only=True, **placement
    )
    model = model.to(device).eval()
    # fused first: its tensors are new memory, so nothing is copied twice
    fused = fuse_weight_storage(model) if fuse else set()
    if torch.device(device).type == "cpu":
        own_memory(model, skip=fused)
    return model


def own_memory(model: torch.nn.Module, skip: set[int] = frozenset()) -> None:
    """Copy parameters that may still be views of the memory-mapped weights file into memory
    of their own. A written mmapped page becomes a private copy, but every page read stays
    counted in the process's resident memory while any tensor keeps the mapping alive: the
    evaluation copy would cost its size twice. Tied parameters are one Parameter: copied once."""
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in skip:
                p.data = p.data.clone()
        for b in model.buffers():
            b.data = b.data.clone()


def _tensor_files(path: str | Path) -> dict[str, tuple[Path, list[int]]]:
    """name -> (file, shape) of every float tensor in a model directory's *.safetensors."""
    where: dict[str, tuple[Path, list[int]]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        entries, _, _ = tensorfile.read_header(file)
        for key in tensorfile.float_tensor_names(file):
            where[key] = (file, entries[key]["shape"])
    return where


def read_weights_into(path: str | Path, targets: dict[str, torch.Tensor]) -> bool:
    """Fill `targets` (any dtype and device) from a model directory's *.safetensors files a
    chunk at a time (tensorfile.py: no whole-file mmap, no second copy of any tensor).
    Returns False, filling nothing, when a name is missing from the files."""
    where = _tensor_files(path)
    if not targets.keys() <= where.keys():
        return False
    for file in sorted({where[name][0] for name in targets}):
        tensorfile.read_into(file, {n: t for n, t in targets.items() if where[n][0] == file})
    return True


def read_fp32_weights(
    path: str | Path, names: list[str], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor] | None:
    """The named tensors of a model directory as float32 on `device`, each allocated once and
    read into place. None when a name is missing from the files (other key names)."""
    where = _tensor_files(path)
    if not set(names) <= where.keys():
        return None
    found = {n: torch.empty(where[n][1], dtype=torch.float32, device=device) for n in names}
    read_weights_into(path, found)
    return found


def load_tokenizer(path: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_hf_dir(
    model, tokenizer, master: dict[str, torch.Tensor], out: Path, dtype: str = "float32"
) -> None:
    """Write `master` as an HF directory (config.json, generation_config.json,
    model.safetensors, tokenizer), in float32 (default: the master itself) or rounded once to
    bfloat16, streamed a chunk at a time (no second copy of the weights)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensorfile.write(out / "model.safetensors", master, {"format": "pt"}, DTYPES[dtype])
    eval_dtype = model.config.dtype
    model.config.dtype = DTYPES[dtype]  # the saved weights' dtype, not the evaluation copy's
    try:
        model.config.save_pretrained(str(out))
    finally:
        model.config.dtype = eval_dtype
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
