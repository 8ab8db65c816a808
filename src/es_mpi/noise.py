"""Seed -> Gaussian noise: independent streams keyed by member seed, tensor name and chunk.

Keying the stream by the tensor's name (not only by the member seed) is what keeps two
same-shaped tensors in different layers from receiving identical noise (docs/design.md, defect 1).
Noise is always generated in float32 with a fixed length per stream: torch's sampler gives
different values for a different length or dtype, so the length is part of the stream.

Two kinds (a run log names its kind in the attribute `noise`):

- `chunked` (logs from format 2 on): a tensor is cut into chunks of CHUNK_ELEMENTS elements
  (the last one shorter), each chunk its own stream keyed by (member seed, tensor name, chunk
  index). Generating, materialising and updating need scratch of one chunk, not of the
  largest tensor, and chunks can be drawn in parallel.
- `tensor` (older logs): one stream per whole tensor, keyed by (member seed, tensor name).
"""

from __future__ import annotations

import hashlib

import torch

_MASK63 = (1 << 63) - 1
NOISE_KINDS = ("chunked", "tensor")
CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32: part of the `chunked` stream definition


def tensor_stream_seed(member_seed: int, tensor_name: str, chunk: int | None = None) -> int:
    """A 63-bit generator seed for one tensor (or one chunk of it) of one member, stable
    across processes."""
    key = f"{int(member_seed)}/{tensor_name}"
    if chunk is not None:
        key += f"/{int(chunk)}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def pieces(numel: int, kind: str) -> list[tuple[int, int, int | None]]:
    """(start, stop, chunk index) of a tensor's streams, in order (`tensor`: one, index None)."""
    if kind == "tensor":
        return [(0, numel, None)]
    if kind != "chunked":
        raise ValueError(f"unknown noise kind '{kind}' (known: {NOISE_KINDS})")
    return [
        (start, min(start + CHUNK_ELEMENTS, numel), k)
        for k, start in enumerate(range(0, numel, CHUNK_ELEMENTS))
    ]


class NoiseSource:
    """Fills float32 buffers with the noise of (member seed, tensor name[, chunk]) on one
    device. One source per thread: a generator is not shared."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device)

    def fill(
        self, out: torch.Tensor, member_seed: int, tensor_name: str, chunk: int | None = None
    ) -> torch.Tensor:
        if out.dtype != torch.float32:
            raise TypeError("noise is generated in float32 only")
        self.generator.manual_seed(tensor_stream_seed(member_seed, tensor_name, chunk))
        return out.normal_(generator=self.generator)

    def sample(
        self,
        member_seed: int,
        tensor_name: str,
        shape: torch.Size,
        device: torch.device | str,
        chunk: int | None = None,
    ) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.float32, device=device)
        return self.fill(out, member_seed, tensor_name, chunk)
