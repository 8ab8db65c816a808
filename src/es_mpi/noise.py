"""Seed -> Gaussian noise, one independent stream per (member seed, tensor name).

Keying the stream by the tensor's name (not only by the member seed) is what keeps two
same-shaped tensors in different layers from receiving identical noise (docs/design.md, defect 1).
Noise is always generated in float32 with the tensor's full shape: torch's CPU sampler gives
different values for a different length or dtype, so the shape is part of the stream.
"""

from __future__ import annotations

import hashlib

import torch

_MASK63 = (1 << 63) - 1


def tensor_stream_seed(member_seed: int, tensor_name: str) -> int:
    """A 63-bit generator seed for one tensor of one member, stable across processes."""
    digest = hashlib.blake2b(f"{int(member_seed)}/{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


class NoiseSource:
    """Fills float32 buffers with the noise of (member seed, tensor name) on one device."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device)

    def fill(self, out: torch.Tensor, member_seed: int, tensor_name: str) -> torch.Tensor:
        if out.dtype != torch.float32:
            raise TypeError("noise is generated in float32 only")
        self.generator.manual_seed(tensor_stream_seed(member_seed, tensor_name))
        return out.normal_(generator=self.generator)

    def sample(
        self, member_seed: int, tensor_name: str, shape: torch.Size, device: torch.device | str
    ) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.float32, device=device)
        return self.fill(out, member_seed, tensor_name)
