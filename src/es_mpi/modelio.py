"""Loading and saving Hugging Face models from local directories only (no hub)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from .config import ConfigError  # noqa: E402

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


def load_model(path: str | Path, dtype: str, device: torch.device, cls=None, config=None):
    if cls is None:
        cls, config = model_class(path)
    model = cls.from_pretrained(
        str(path), config=config, dtype=DTYPES[dtype], local_files_only=True
    )
    return model.to(device).eval()


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


def read_fp32_weights(path: str | Path, names: list[str]) -> dict[str, torch.Tensor] | None:
    """The named tensors of a model directory's *.safetensors files, as float32, read tensor
    by tensor with plain file reads (no mmap, so at most one extra tensor is resident).

    Returns None when a name is missing from the files (a checkpoint with other key names).
    """
    wanted, found = set(names), {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
            for key, meta in header.items():
                if key not in wanted or meta["dtype"] not in _SAFETENSORS_DTYPES:
                    continue
                start, end = meta["data_offsets"]
                f.seek(8 + header_len + start)
                raw = bytearray(f.read(end - start))
                tensor = torch.frombuffer(raw, dtype=_SAFETENSORS_DTYPES[meta["dtype"]])
                found[key] = tensor.to(torch.float32).reshape(meta["shape"])
    return found if wanted <= found.keys() else None


def load_tokenizer(path: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_hf_dir(
    model, tokenizer, master: dict[str, torch.Tensor], out: Path, dtype: str = "float32"
) -> None:
    """Write `master` as an HF directory (config.json, model.safetensors, tokenizer), in
    float32 (default: the master itself) or rounded once to bfloat16."""
    torch_dtype = getattr(torch, dtype)
    eval_dtype = model.config.dtype
    model.config.dtype = torch_dtype
    try:
        state = {name: t.detach().to("cpu", torch_dtype).contiguous() for name, t in master.items()}
        model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    finally:
        model.config.dtype = eval_dtype
    # save_pretrained records the dtype of the live model's parameters: state the saved one
    config_path = Path(out) / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = dtype
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
