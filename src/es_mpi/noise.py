"""Seed -> Gaussian noise: independent streams keyed by member seed, tensor name and chunk.

Keying the stream by the tensor's name (not only by the member seed) is what keeps two
same-shaped tensors in different layers from receiving identical noise (docs/design.md, defect 1).
Noise is always produced in float32.

Three kinds (a run log names its kind in the attribute `noise`):

- `counter` (logs from format 3 on): element j of chunk c of a tensor is a function of
  (member seed, tensor name, c, j) built from 32-bit integer operations, a correctly rounded
  int -> float conversion and a table lookup: the same bits on any CPU kernel set, any GPU and
  any block size (docs/design.md, "Noise"). `CounterNormal` below.
- `chunked` (format 2): a tensor is cut into chunks of CHUNK_ELEMENTS elements (the last one
  shorter), each chunk its own torch generator stream keyed by (member seed, tensor name,
  chunk index). The values depend on the device and on its generator's kernel.
- `tensor` (format 1): one torch generator stream per whole tensor.

Generator streams give different values for a different length or dtype, so for those kinds
the length is part of the stream.
"""

from __future__ import annotations

import functools
import hashlib
import statistics

import numpy as np
import torch

_MASK63 = (1 << 63) - 1
NOISE_KINDS = ("counter", "chunked", "tensor")
NEW_RUN_KIND = "counter"
CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32: part of the chunked and counter definitions


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
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind '{kind}' (known: {NOISE_KINDS})")
    return [
        (start, min(start + CHUNK_ELEMENTS, numel), k)
        for k, start in enumerate(range(0, numel, CHUNK_ELEMENTS))
    ]


class NoiseSource:
    """Fills float32 buffers with the noise of (member seed, tensor name[, chunk]) on one
    device, in the run's noise kind. One source per thread: scratch is not shared."""

    def __init__(self, device: torch.device | str = "cpu", kind: str = NEW_RUN_KIND) -> None:
        self.kind = kind
        self.device = torch.device(device)
        if kind == "counter":
            self.counter = CounterNormal(self.device)
        else:
            self.generator = torch.Generator(device=device)

    def fill(
        self, out: torch.Tensor, member_seed: int, tensor_name: str, chunk: int | None = None
    ) -> torch.Tensor:
        if out.dtype != torch.float32:
            raise TypeError("noise is generated in float32 only")
        stream = tensor_stream_seed(member_seed, tensor_name, chunk)
        if self.kind == "counter":
            self.counter.fill(out.view(-1), stream)
            return out
        self.generator.manual_seed(stream)
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


# --- the update's arithmetic of each kind -----------------------------------------------------


def separately_rounded(kind: str) -> bool:
    """Does this kind's update round every product and sum on its own (counter: the same
    bits on every device), or use fused multiply-adds (older kinds, bits of their device)?"""
    return kind == "counter"


def float32(value: float) -> float:
    """A Python float rounded to float32 first: a scalar factor then means the same on
    every device (CPU and CUDA kernels both multiply float32 tensors in float32)."""
    return float(np.float32(value))


def accumulate(
    acc: torch.Tensor, eps: torch.Tensor, coef: float, product: torch.Tensor | None
) -> None:
    """acc += coef * eps: fused when `product` is None (older kinds), else the product
    rounded into `product` first, then added (counter kind)."""
    if product is None:
        acc.add_(eps, alpha=coef)
    else:
        acc.add_(torch.mul(eps, float32(coef), out=product))


def add_scaled(master: torch.Tensor, acc: torch.Tensor, scale: float, separate: bool) -> float:
    """master += scale * acc (fused, or scale applied to acc first when `separate`, which
    changes acc). Returns the factor |acc| still needs to measure the update."""
    if not separate:
        master.add_(acc, alpha=scale)
        return scale
    master.add_(acc.mul_(float32(scale)) if scale != 1.0 else acc)
    return 1.0


# --- the counter kind -----------------------------------------------------------------------
# Element j of a stream with 64-bit key (k0, k1):
#   h = lowbias32((j * 0x9E3779B9 + k1) ^ k0)            32-bit wrap-around arithmetic
#   k = 2 * (h & 0x3FFFFFFF) + 1                         odd, so v = k / 2^32 lies in (0, 1/2)
#   x = +-M[(bits(float32(k)) >> 12) - MAG_BASE]         sign from bit 31 of h
# M holds |inverse normal CDF| at the middle of each cell of v: the cell is float32(k)'s
# exponent and top 11 mantissa bits (2,048 cells per octave of v, from 2^-32 to 1/2, so the
# tails reach 6.2 sigma). Only integer operations, one correctly rounded int -> float
# conversion and a lookup: the same bits everywhere.
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B9, 0x7FEB352D, 0x846CA68B
_MAG_SHIFT = 12
# Elements per pass on the CPU: small enough to stay in cache, large enough that the ~25 torch
# calls per block cost little (2^16: 2.2, 2^18: 1.5 ns per element on 2 threads, measured).
# GPUs take a whole chunk.
_BLOCK = {"cpu": 1 << 18}


def _int32(value: int) -> int:
    """A 32-bit pattern as the signed value torch's int32 arithmetic uses."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _float32_bits(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32).view(np.int32)


MAG_BASE = int(_float32_bits(np.array([1.0]))[0] >> _MAG_SHIFT)


def magnitude_table() -> np.ndarray:
    """|N^-1(v)| at the middle of every cell of v = k / 2^32 (float64 -> float32)."""
    last = int(_float32_bits(np.array([2.0**31]))[0] >> _MAG_SHIFT)
    cells = np.arange(MAG_BASE, last + 1, dtype=np.int64)
    low = (cells << _MAG_SHIFT).astype(np.int32).view(np.float32).astype(np.float64)
    high = ((cells + 1) << _MAG_SHIFT).astype(np.int32).view(np.float32).astype(np.float64)
    middle = np.minimum((low + high) / 2 * 2.0**-32, 0.5)
    inverse = statistics.NormalDist().inv_cdf
    return np.array([-inverse(v) for v in middle], dtype=np.float32)


# The table's bytes, checked when it is built: a platform whose math library rounds the
# float64 inverse CDF differently enough to change a float32 entry stops with an error
# instead of drawing other noise.
MAG_TABLE_SHA256 = "28e4dbd29c3a025d669ba0cb58c8b1cad67d6e525c77453d13e22b4b83683e84"


@functools.cache
def checked_magnitude_table() -> np.ndarray:
    table = magnitude_table()
    digest = hashlib.sha256(table.tobytes()).hexdigest()
    if digest != MAG_TABLE_SHA256:
        raise RuntimeError(
            f"the counter noise table built here has sha256 {digest}, not {MAG_TABLE_SHA256}"
            " (this platform's math library differs): runs would not replay elsewhere"
        )
    return table


class CounterNormal:
    """The counter kind's noise on one device, with its table and scratch."""

    def __init__(self, device: torch.device) -> None:
        self.table = torch.from_numpy(checked_magnitude_table()).to(device)
        self.block = _BLOCK.get(device.type, CHUNK_ELEMENTS)
        self.counter = torch.arange(self.block, dtype=torch.int32, device=device)
        self.hash = torch.empty(self.block, dtype=torch.int32, device=device)
        self.shifted = torch.empty(self.block, dtype=torch.int32, device=device)
        self.value = torch.empty(self.block, dtype=torch.float32, device=device)

    def fill(self, out: torch.Tensor, stream: int) -> torch.Tensor:
        """out[j] = the stream's element j, j = 0 .. len(out) - 1 (a flat float32 tensor)."""
        k0, k1 = _int32(stream), _int32(stream >> 32)
        for start in range(0, out.numel(), self.block):
            n = min(self.block, out.numel() - start)
            self._block(out[start : start + n], start, k0, k1)
        return out

    def fill_segments(self, out: torch.Tensor, streams: list[int], lengths: list[int]) -> None:
        """Several streams' first elements back to back in one flat `out`, in one pass: the
        same values as one `fill` per segment, without ~25 torch calls per small tensor."""
        counters, segment = self._layout(tuple(lengths), out.device)
        keys = torch.tensor([_int32(s) for s in streams] + [_int32(s >> 32) for s in streams])
        keys = keys.to(device=out.device, dtype=torch.int32)
        k0 = keys[: len(streams)][segment]
        k1 = keys[len(streams) :][segment]
        self._values(out, counters.clone(), k0, k1, torch.empty_like(k0), torch.empty_like(out))

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a handful of layouts per process
    def _layout(self, lengths: tuple[int, ...], device: torch.device):
        """Per element: its counter within its segment (int32) and its segment's index."""
        count = torch.tensor(lengths, device=device)
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), count)
        first = torch.cumsum(count, 0) - count
        counters = (torch.arange(int(count.sum()), device=device) - first[segment]).to(torch.int32)
        return counters, segment

    def _block(self, out: torch.Tensor, start: int, k0: int, k1: int) -> None:
        n = out.numel()
        h, t, v = self.hash[:n], self.shifted[:n], self.value[:n]
        torch.add(self.counter[:n], start, out=h)
        self._values(out, h, k0, k1, t, v)

    def _values(self, out, h, k0, k1, t, v) -> None:
        """out <- the values of counters h (int32, overwritten) under keys k0, k1 (ints or
        int32 tensors); t, v: int32 and float32 scratch of the same length."""
        h.mul_(_int32(_GOLDEN)).add_(k1).bitwise_xor_(k0)
        for shift, mask, multiplier in ((16, 0xFFFF, _MIX1), (15, 0x1FFFF, _MIX2)):
            h.bitwise_xor_(torch.bitwise_right_shift(h, shift, out=t).bitwise_and_(mask))
            h.mul_(_int32(multiplier))
        h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=t).bitwise_and_(0xFFFF))
        torch.bitwise_and(h, 0x3FFFFFFF, out=t).mul_(2).add_(1)
        v.copy_(t)  # int -> float32, round to nearest: the same on every device
        index = v.view(torch.int32).bitwise_right_shift_(_MAG_SHIFT).sub_(MAG_BASE)
        torch.index_select(self.table, 0, index, out=out)
        out.view(torch.int32).bitwise_or_(h.bitwise_and_(_int32(1 << 31)))  # the sign bit
