"""Fingerprints of the fp32 master weights: what the run log records after every iteration.

Two kinds (the log names its kind in the attribute `fingerprint`; docs/design.md):

- `sums` (logs written from format 2 on): each tensor's raw fp32 bits read as int32 words,
  summed in rows of ROW_WORDS words with wrap-around (mod 2^32), then S0 = sum of the row sums
  and S1 = sum of (row index + 1) x row sum; blake2b over names, shapes, S0 and S1. Integer
  sums are exact and independent of summation order, so every device and thread count gives
  the same value; any single changed bit changes S0 (it moves one word by +-2^b, b < 32), and
  S1 sees values moved between rows. It runs where the tensors live, one pass at memory
  bandwidth, and only 2 integers per tensor cross to the host.
- `sha256` (older logs): sha256 over names, shapes and every fp32 byte, on the host.

Both are fed chunk by chunk (`begin` a tensor, then `add` its words in order, in chunks of a
multiple of ROW_WORDS), so a checkpoint file is checked without holding it in memory.
"""

from __future__ import annotations

import hashlib

import torch

FINGERPRINT_KINDS = ("sums", "sha256")
ROW_WORDS = 4096
# Words per chunk when a file is streamed: a multiple of ROW_WORDS (16 MiB of int32).
STREAM_WORDS = 1024 * ROW_WORDS


class SumsFingerprint:
    """Kind `sums`. Per tensor, row sums stay on the tensor's device until `hexdigest`."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._rows: list[list[torch.Tensor]] = []

    def begin(self, name: str, shape: tuple[int, ...]) -> None:
        self._names.append(f"{name}:{tuple(shape)}")
        self._rows.append([])

    def add(self, words: torch.Tensor) -> None:
        """The next int32 words of the current tensor (a chunk's length is a multiple of
        ROW_WORDS, except the tensor's last chunk)."""
        full = words.numel() // ROW_WORDS * ROW_WORDS
        rows = self._rows[-1]
        if full:
            rows.append(words[:full].view(-1, ROW_WORDS).sum(dim=1, dtype=torch.int32))
        if full < words.numel():
            rows.append(words[full:].sum(dtype=torch.int32).reshape(1))

    def hexdigest(self) -> str:
        sums = []
        for rows in self._rows:
            if not rows:
                sums.append(torch.zeros(2, dtype=torch.int64))
                continue
            r = torch.cat([x.to(rows[0].device) for x in rows]).to(torch.int64)
            index = torch.arange(1, r.numel() + 1, dtype=torch.int64, device=r.device)
            sums.append(torch.stack([r.sum(), (r * index).sum()]))
        # one device -> host copy of 2 integers per tensor
        values = torch.stack([s.to(sums[0].device) for s in sums]).cpu() if sums else None
        h = hashlib.blake2b(digest_size=32)
        for i, name in enumerate(self._names):
            h.update(name.encode())
            h.update(values[i].numpy().tobytes())
        return h.hexdigest()


class Sha256Fingerprint:
    """Kind `sha256` (logs before format 2): every byte, in the tensors' name order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def begin(self, name: str, shape: tuple[int, ...]) -> None:
        self._h.update(f"{name}:{tuple(shape)};".encode())

    def add(self, words: torch.Tensor) -> None:
        self._h.update(words.detach().cpu().contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def new_fingerprint(kind: str) -> SumsFingerprint | Sha256Fingerprint:
    if kind == "sums":
        return SumsFingerprint()
    if kind == "sha256":
        return Sha256Fingerprint()
    raise ValueError(f"unknown fingerprint kind '{kind}' (known: {FINGERPRINT_KINDS})")


def fingerprint(tensors: dict[str, torch.Tensor], kind: str) -> str:
    """The fingerprint of fp32 tensors (any device), in name order."""
    fp = new_fingerprint(kind)
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.dtype != torch.float32:
            raise TypeError(f"fingerprints are of float32 tensors: '{name}' is {t.dtype}")
        fp.begin(name, tuple(t.shape))
        fp.add(t.contiguous().view(-1).view(torch.int32))
    return fp.hexdigest()
