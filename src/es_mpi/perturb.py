"""fp32 master weights, the evaluation copy, and the ES update.

The master weights are never perturbed in place (docs/design.md, invariant 3 / defect 2): a member
is evaluated on the model's own parameters (the evaluation copy, in any dtype), overwritten
with master + sign * sigma * eps. Updates accumulate in fp32 (defect 3).

Work goes piece by piece: a piece is one noise stream (noise.py: a chunk of at most
CHUNK_ELEMENTS, or a whole tensor for logs of kind `tensor`), so scratch memory is two
chunk-sized buffers per lane, not buffers the size of the largest tensor. On the CPU,
`lanes` threads take pieces round-robin; every element sees the same operations in the same
order whatever the lane count, so the bits do not depend on it.
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import tensorfile
from .fingerprint import fingerprint
from .lowrank import LowRankNoise
from .noise import (
    CHUNK_ELEMENTS,
    NEW_RUN_KIND,
    NoiseSource,
    accumulate,
    add_scaled,
    pieces,
    separately_rounded,
    tensor_stream_seed,
)

# Below this many parameters one lane does everything (a thread hand-off costs more).
PARALLEL_MIN_NUMEL = 2 * CHUNK_ELEMENTS


@dataclass(frozen=True)
class Piece:
    name: str
    start: int  # flat element range of the tensor
    stop: int
    chunk: int | None  # stream index within the tensor (None: the whole tensor's stream)


class Lane:
    """One worker's noise source and scratch (noise, update accumulator, a product)."""

    def __init__(self, device: torch.device, size: int, kind: str) -> None:
        self.source = NoiseSource(device, kind)
        self.noise = torch.empty(size, dtype=torch.float32, device=device)
        self.acc = torch.empty(size, dtype=torch.float32, device=device)
        self.product = (  # counter kind: each product rounded here before it is added
            torch.empty(size, dtype=torch.float32, device=device)
            if separately_rounded(kind)
            else None
        )


class MasterWeights:
    """The trainable state of a run: one fp32 tensor per named parameter of the model."""

    def __init__(
        self,
        model: nn.Module,
        master: dict[str, torch.Tensor] | None = None,
        noise_cache_bytes: int = 0,
        extra_targets: dict | None = None,
        noise_kind: str = NEW_RUN_KIND,
        fingerprint_kind: str = "sums",
        lanes: int = 1,
    ) -> None:
        """`master`: the fp32 base weights by parameter name, or None to copy them from a
        float32 `model`. The model's own parameters are the evaluation copy, plus
        `extra_targets`: tensors stored otherwise (int8 layers, quant.py) by weight name.
        `noise_kind` and `fingerprint_kind` are a run log's (noise.py, fingerprint.py);
        `lanes`: CPU threads drawing noise pieces in parallel (results do not depend on it)."""
        # named_parameters() drops tied duplicates (e.g. lm_head tied to the embedding).
        self.eval_params: dict[str, torch.Tensor] = dict(model.named_parameters())
        self.eval_params.update(extra_targets or {})
        self.master: dict[str, torch.Tensor] = {}
        for name, p in self.eval_params.items():
            p.requires_grad_(False)
            if master is not None:
                self.master[name] = master[name].to(p.device, torch.float32)
            elif p.dtype == torch.float32:
                self.master[name] = p.detach().clone()
            else:
                raise ValueError(f"master weights must be float32: '{name}' is {p.dtype}")
        self.names = list(self.master)
        self.noise_kind, self.fingerprint_kind = noise_kind, fingerprint_kind
        # Per-tensor multiplier of sigma and alpha (es.sigma_scale); 1.0 = plain ES.
        self.scales: dict[str, float] = dict.fromkeys(self.names, 1.0)
        self.numel = sum(t.numel() for t in self.master.values())
        self.device = next(iter(self.master.values())).device
        self.pieces = [
            Piece(name, start, stop, chunk)
            for name in self.names
            for start, stop, chunk in pieces(self.master[name].numel(), noise_kind)
        ]
        self._lanes, self._pool = self._make_lanes(lanes)
        # Flat offsets of each tensor, for the noise cache's flat slots.
        sizes = [self.master[name].numel() for name in self.names]
        self._offsets = dict(zip(self.names, [0, *itertools.accumulate(sizes)], strict=False))
        # Noise of this rank's own members, kept from evaluation to the update so it is not
        # generated twice, in flat buffers reused across iterations (count set by a byte
        # budget). Cached or generated again, the values are the same.
        self._slots_max = noise_cache_bytes // (4 * self.numel)
        self._slots: list[torch.Tensor] = []
        self._cache: dict[int, torch.Tensor] = {}  # member seed -> filled slot
        # Targets that are not tensors (int8 layers) take a whole fp32 tensor at once.
        self._whole_targets = [
            n for n in self.names if not isinstance(self.eval_params[n], torch.Tensor)
        ]
        self._whole_buf: torch.Tensor | None = None
        # Counter noise of a model of at most one chunk: a member's noise in one pass over
        # all its tensors (noise.CounterNormal.fill_segments), not ~25 torch calls per tensor.
        self._one_pass = noise_kind == "counter" and self.numel <= CHUNK_ELEMENTS
        self._whole_member: torch.Tensor | None = None
        self._drawn: tuple[int, torch.Tensor] | None = None  # (member seed, its flat noise)
        # es.mode lowrank: the perturbations are B A^T / sqrt(r) (see lowrank.py)
        self.lowrank: LowRankNoise | None = None
        self.update_norm_ratio = 0.0  # of the latest update

    def _make_lanes(self, lanes: int) -> tuple[list[Lane], ThreadPoolExecutor | None]:
        """Scratch of the largest piece per lane; threads only where they pay."""
        if (
            self.device.type != "cpu"
            or self.noise_kind != "chunked"
            or self.numel < PARALLEL_MIN_NUMEL
        ):
            # A GPU queues kernels anyway; whole-tensor pieces would need big scratch; counter
            # noise is made of torch operations that use the threads themselves (lanes would
            # only contend for them: 2.15 vs 1.46 ns per element on 2 threads, measured).
            lanes = 1
        largest = max(p.stop - p.start for p in self.pieces)
        pool = ThreadPoolExecutor(lanes) if lanes > 1 else None
        return [Lane(self.device, largest, self.noise_kind) for _ in range(lanes)], pool

    def use_lowrank(self, rank: int, perturb_vectors: bool) -> LowRankNoise:
        shapes = {name: t.shape for name, t in self.master.items()}
        self.lowrank = LowRankNoise(shapes, rank, perturb_vectors, self.device, self.noise_kind)
        self._slots_max = 0  # low-rank factors are cheap to draw again
        return self.lowrank

    def _run(self, work, items: list) -> list:
        """work(lane, item) for every item, lanes taking items round-robin; results in order."""
        if self._pool is None:
            return [work(self._lanes[0], item) for item in items]
        n = len(self._lanes)

        def lane_job(k: int) -> list:
            return [work(self._lanes[k], item) for item in items[k::n]]

        per_lane = list(self._pool.map(lane_job, range(n)))
        out = [None] * len(items)
        for k, results in enumerate(per_lane):
            out[k::n] = results
        return out

    def _free_slot(self) -> torch.Tensor | None:
        if len(self._cache) < len(self._slots):
            return self._slots[len(self._cache)]
        if len(self._slots) < self._slots_max:
            self._slots.append(torch.empty(self.numel, dtype=torch.float32, device=self.device))
            return self._slots[-1]
        return None

    def _noise(
        self, lane: Lane, piece: Piece, member_seed: int, slot: torch.Tensor | None = None
    ) -> torch.Tensor:
        """eps(member_seed) of one piece, flat: from the cache, else drawn into `slot` (to
        be cached) or into the lane's scratch."""
        begin = self._offsets[piece.name]
        cached = self._cache.get(member_seed)
        if cached is None and self._drawn is not None and self._drawn[0] == member_seed:
            cached = self._drawn[1]
        if cached is not None:  # filled when this member was evaluated (or drawn whole)
            return cached[begin + piece.start : begin + piece.stop]
        if slot is not None:
            out = slot[begin + piece.start : begin + piece.stop]
        else:
            out = lane.noise[: piece.stop - piece.start]
        return lane.source.fill(out, member_seed, piece.name, piece.chunk)

    def clear_noise_cache(self) -> None:
        self._cache.clear()
        self._drawn = None

    def _draw_whole(self, member_seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """A member's counter noise of every tensor, flat in name order, in one pass."""
        if out is None:
            if self._whole_member is None:
                self._whole_member = torch.empty(self.numel, device=self.device)
            out = self._whole_member
        streams = [tensor_stream_seed(member_seed, p.name, p.chunk) for p in self.pieces]
        source = self._lanes[0].source.counter
        source.fill_segments(out, streams, [p.stop - p.start for p in self.pieces])
        return out

    def materialise(self, member_seed: int, sign: int, sigma: float) -> None:
        """eval copy <- master + sign * sigma * eps(member_seed), rounded once to its dtype."""
        if self.lowrank is not None:
            return self._materialise_lowrank(member_seed, sign, sigma)
        slot = None if member_seed in self._cache else self._free_slot()
        if self._one_pass and member_seed not in self._cache:
            self._drawn = (member_seed, self._draw_whole(member_seed, slot))

        def work(lane: Lane, piece: Piece) -> None:
            scale = self.scales[piece.name]
            target = self.eval_params[piece.name]
            if scale == 0.0 or not isinstance(target, torch.Tensor):
                return  # frozen (eval copy == master), or an int8 layer (below)
            eps = self._noise(lane, piece, member_seed, slot)
            master = self.master[piece.name].view(-1)[piece.start : piece.stop]
            out = target.view(-1)[piece.start : piece.stop]
            if out.dtype == torch.float32:
                torch.add(master, eps, alpha=sign * sigma * scale, out=out)
            else:  # the fp32 sum in the idle accumulator, then rounded once. (An fp32 sum
                # written straight into a bf16 `out` allocates a temporary per call: slower,
                # and each lane's allocator arena keeps them.)
                fp32_sum = lane.acc[: piece.stop - piece.start]
                out.copy_(torch.add(master, eps, alpha=sign * sigma * scale, out=fp32_sum))

        self._run(work, self.pieces)
        for name in self._whole_targets:
            if self.scales[name] != 0.0:
                self.eval_params[name].copy_(self._whole_sum(name, member_seed, sign * sigma, slot))
        if slot is not None:
            self._cache[member_seed] = slot

    def _whole_sum(
        self, name: str, member_seed: int, step: float, slot: torch.Tensor | None
    ) -> torch.Tensor:
        """master + step * scale * eps of one whole tensor in fp32 (for int8 layers)."""
        master = self.master[name]
        if self._whole_buf is None:
            size = max(self.master[n].numel() for n in self._whole_targets)
            self._whole_buf = torch.empty(size, dtype=torch.float32, device=self.device)
        out = self._whole_buf[: master.numel()]
        for piece in (p for p in self.pieces if p.name == name):
            eps = self._noise(self._lanes[0], piece, member_seed, slot)
            torch.add(
                master.view(-1)[piece.start : piece.stop],
                eps,
                alpha=step * self.scales[name],
                out=out[piece.start : piece.stop],
            )
        return out.view(master.shape)

    def _materialise_lowrank(self, member_seed: int, sign: int, sigma: float) -> None:
        for name in self.names:
            dense = self.lowrank.dense(member_seed, name) if self.scales[name] else None
            target = self.eval_params[name]
            if dense is None:
                target.copy_(self.master[name])
            else:
                target.copy_(self.master[name] + sign * sigma * self.scales[name] * dense)

    def load_master(self) -> None:
        """eval copy <- master (unperturbed), e.g. before saving or a held-out evaluation."""
        for name in self.names:
            self.eval_params[name].copy_(self.master[name])

    def apply_update(self, coefficients: list[tuple[int, float]]) -> None:
        """master += scale * sum_k coef_k * eps(seed_k), summed in fp32 per element in the
        order of `coefficients` (the same on every rank).

        Also sets `update_norm_ratio` = |update| / |master after the update| (a metric)."""
        if self.lowrank is not None:
            squares = [self._update_lowrank(name, coefficients) for name in self.names]
        elif self._one_pass:
            squares = self._update_one_pass(coefficients)
        else:
            squares = self._run(
                lambda lane, piece: self._update_piece(lane, piece, coefficients), self.pieces
            )
        # one device sync for the metric
        update_sq, master_sq = torch.stack([torch.stack(s) for s in squares]).sum(dim=0).tolist()
        self.update_norm_ratio = (update_sq / master_sq) ** 0.5 if master_sq else 0.0
        self.clear_noise_cache()

    def _update_piece(
        self, lane: Lane, piece: Piece, coefficients: list[tuple[int, float]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One piece of the update; returns (|update|^2, |master|^2) of the piece (float64)."""
        master = self.master[piece.name].view(-1)[piece.start : piece.stop]
        scale = self.scales[piece.name]
        update_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        if coefficients and scale != 0.0:
            size = piece.stop - piece.start
            acc = lane.acc[:size].zero_()
            product = None if lane.product is None else lane.product[:size]
            for seed, coef in coefficients:
                accumulate(acc, self._noise(lane, piece, seed), coef, product)
            left = add_scaled(master, acc, scale, product is not None)
            update_sq = (torch.linalg.vector_norm(acc).double() * abs(left)) ** 2
        return update_sq, torch.linalg.vector_norm(master).double() ** 2

    def _update_one_pass(self, coefficients: list[tuple[int, float]]) -> list:
        """_update_piece's arithmetic for every tensor at once, members outer: per element
        the same products and sums in the same order, so the same bits."""
        acc = torch.zeros(self.numel, device=self.device)
        product = torch.empty(self.numel, device=self.device)
        for seed, coef in coefficients:
            eps = self._cache.get(seed)
            accumulate(acc, eps if eps is not None else self._draw_whole(seed), coef, product)
        squares = []
        for name in self.names:
            master, scale = self.master[name].view(-1), self.scales[name]
            update_sq = torch.zeros((), dtype=torch.float64, device=self.device)
            if coefficients and scale != 0.0:
                part = acc[self._offsets[name] : self._offsets[name] + master.numel()]
                add_scaled(master, part, scale, separate=True)
                update_sq = torch.linalg.vector_norm(part).double() ** 2
            squares.append((update_sq, torch.linalg.vector_norm(master).double() ** 2))
        return squares

    def _update_lowrank(
        self, name: str, coefficients: list[tuple[int, float]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        master = self.master[name]
        update_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        acc = self.lowrank.weighted_sum(name, coefficients) if self.scales[name] else None
        if acc is not None:
            left = add_scaled(master, acc, self.scales[name], self.lowrank.elementwise)
            update_sq = (torch.linalg.vector_norm(acc).double() * abs(left)) ** 2
        return update_sq, torch.linalg.vector_norm(master).double() ** 2

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.master)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) ^ set(state)
        if missing:
            raise ValueError(f"checkpoint tensors do not match the model: {sorted(missing)[:5]}")
        for name in self.names:
            self.master[name].copy_(state[name])

    def load_file(self, path: Path) -> None:
        """Master <- a checkpoint file, read tensor by tensor in chunks into place."""
        names = set(tensorfile.float_tensor_names(path))
        if names != set(self.names):
            raise ValueError(
                f"'{path}': tensors do not match the model: {sorted(names ^ set(self.names))[:5]}"
            )
        tensorfile.read_into(path, self.master)

    def checksum(self) -> str:
        """The master's fingerprint of this run's kind (fingerprint.py), computed in place."""
        return fingerprint(self.master, self.fingerprint_kind)


def per_tensor_std(master: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each tensor's weight std (sample std): sigma and alpha scales for es.sigma_scale.

    The same bits on every device and kernel set (every rank of a mixed job derives its own):
    the values are rounded to integer multiples of 2^q, q = the peak's exponent - 20 (at most
    2^20 steps; smaller values lose bits far below the std), summed as int64 in chunks of
    2^18 (exact, so the order does not matter), and the std is computed from the exact sums
    with Python integers and one correctly rounded square root."""
    out = {}
    for name, t in master.items():
        flat = t.detach().reshape(-1).float()
        if flat.numel() == 1:
            out[name] = abs(float(flat))
            continue
        low, high = torch.aminmax(flat)  # (no temporary the size of the tensor)
        q = math.frexp(max(-float(low), float(high)))[1] - 20
        total, squares = 0, 0
        for chunk in flat.split(1 << 18):  # float64: x * 2^-q exact for any float32 x
            steps = torch.round(chunk.double() * 2.0**-q).to(torch.int64)
            total += int(steps.sum())
            squares += int((steps * steps).sum())
        n = flat.numel()
        variance = (n * squares - total * total) / (n * (n - 1))
        out[name] = math.ldexp(math.sqrt(variance), q)
    return out


def weights_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and the raw fp32 bytes of every tensor, in name order."""
    return fingerprint({k: v.float() for k, v in tensors.items()}, "sha256")
