"""safetensors files read and written in bounded chunks (docs/design.md, memory).

The `safetensors` package serialises a whole state dict into one bytes object and loads whole
tensors: at 0.5B parameters that is a second copy of the fp32 master (2 GB) at every
checkpoint. Here a tensor goes between file and memory STREAM_BYTES at a time, converted to
the target dtype and copied to the target device chunk by chunk, so the transient memory of
loading, checkpointing and saving is a few chunk buffers whatever the model size. The files
are ordinary safetensors files (8-byte header length, JSON header, raw little-endian data).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .fingerprint import STREAM_WORDS, new_fingerprint

STREAM_BYTES = 4 * STREAM_WORDS  # 16 MiB
DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries by name, metadata, byte offset of the data section)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    metadata = header.pop("__metadata__", {}) or {}
    return header, metadata, 8 + header_len


def _chunks(f, start: int, nbytes: int, itemsize: int) -> Iterator[tuple[int, bytearray]]:
    """(element offset, raw bytes) of [start, start + nbytes), STREAM_BYTES at a time."""
    step = STREAM_BYTES // itemsize * itemsize
    f.seek(start)
    done = 0
    while done < nbytes:
        raw = bytearray(f.read(min(step, nbytes - done)))
        if not raw or len(raw) % itemsize:
            raise ValueError(f"'{f.name}' is truncated")
        yield done // itemsize, raw
        done += len(raw)


def read_into(path: str | Path, targets: dict[str, torch.Tensor]) -> None:
    """Fill each target tensor (any dtype and device) with the file's tensor of that name."""
    entries, _, data_start = read_header(path)
    missing = set(targets) - entries.keys()
    if missing:
        raise KeyError(f"'{path}' has no tensor {sorted(missing)[0]}")
    with open(path, "rb") as f:
        for name, target in targets.items():
            meta = entries[name]
            dtype = CODE_DTYPES[meta["dtype"]]
            if tuple(meta["shape"]) != tuple(target.shape):
                raise ValueError(f"'{path}': '{name}' has shape {meta['shape']}")
            begin, end = meta["data_offsets"]
            flat = target.view(-1)
            itemsize = dtype.itemsize
            for offset, raw in _chunks(f, data_start + begin, end - begin, itemsize):
                values = torch.frombuffer(raw, dtype=dtype)
                flat[offset : offset + values.numel()].copy_(values)


def float_tensor_names(path: str | Path) -> list[str]:
    entries, _, _ = read_header(path)
    return [name for name, meta in entries.items() if meta["dtype"] in CODE_DTYPES]


def file_fingerprint(path: str | Path, kind: str) -> str:
    """The fingerprint (fingerprint.py) of a float32 safetensors file, streamed."""
    entries, _, data_start = read_header(path)
    fp = new_fingerprint(kind)
    with open(path, "rb") as f:
        for name in sorted(entries):
            meta = entries[name]
            if meta["dtype"] != "F32":
                raise ValueError(f"'{path}': '{name}' is {meta['dtype']}, not F32")
            fp.begin(name, tuple(meta["shape"]))
            begin, end = meta["data_offsets"]
            for _, raw in _chunks(f, data_start + begin, end - begin, 4):
                fp.add(torch.frombuffer(raw, dtype=torch.int32))
    return fp.hexdigest()


def write(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write `tensors` (any device; converted to `dtype` when given) as a safetensors file,
    in name order, a chunk at a time; flushed and fsynced before returning."""
    names = sorted(tensors)
    header: dict[str, dict] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in names:
        t = tensors[name]
        out_dtype = dtype or t.dtype
        nbytes = t.numel() * out_dtype.itemsize
        header[name] = {
            "dtype": DTYPE_CODES[out_dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            t = tensors[name].detach()
            flat = t.reshape(-1)  # a view for the contiguous tensors written here
            out_dtype = dtype or t.dtype
            step = STREAM_BYTES // out_dtype.itemsize
            for start in range(0, flat.numel(), step):
                piece = flat[start : start + step].to("cpu", out_dtype)
                f.write(memoryview(piece.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
