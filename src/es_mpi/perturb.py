"""fp32 master weights, the evaluation copy, and the ES update.

The master weights are never perturbed in place (docs/design.md, invariant 3 / defect 2): a member
is evaluated on the model's own parameters (the evaluation copy, in any dtype), overwritten
tensor by tensor with master + sign * sigma * eps. Updates accumulate in fp32 (defect 3).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .lowrank import LowRankNoise
from .noise import NoiseSource


class MasterWeights:
    """The trainable state of a run: one fp32 tensor per named parameter of the model."""

    def __init__(
        self,
        model: nn.Module,
        master: dict[str, torch.Tensor] | None = None,
        noise_cache_bytes: int = 0,
        extra_targets: dict | None = None,
    ) -> None:
        """`master`: the fp32 base weights by parameter name, or None to copy them from a
        float32 `model`. The model's own parameters are the evaluation copy, plus
        `extra_targets`: tensors stored otherwise (int8 layers, quant.py) by weight name."""
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
        # Per-tensor multiplier of sigma and alpha (es.sigma_scale); 1.0 = plain ES.
        self.scales: dict[str, float] = dict.fromkeys(self.names, 1.0)
        self.numel = sum(t.numel() for t in self.master.values())
        device = next(iter(self.master.values())).device
        self.noise = NoiseSource(device)
        largest = max(t.numel() for t in self.master.values())
        # Two scratch buffers of the largest tensor: noise, and the update accumulator.
        self._noise_buf = torch.empty(largest, dtype=torch.float32, device=device)
        self._acc_buf = torch.empty(largest, dtype=torch.float32, device=device)
        # Noise of this rank's own members, kept from evaluation to the update so it is not
        # generated twice, in flat buffers reused across iterations (count set by a byte
        # budget). Cached or generated again, the values are the same.
        self._offsets: dict[str, int] = {}
        offset = 0
        for name in self.names:
            self._offsets[name] = offset
            offset += self.master[name].numel()
        self._slots_max = noise_cache_bytes // (4 * self.numel)
        self._slots: list[torch.Tensor] = []
        self._cache: dict[int, torch.Tensor] = {}  # member seed -> filled slot
        # es.mode lowrank: the perturbations are B A^T / sqrt(r) (see lowrank.py)
        self.lowrank: LowRankNoise | None = None
        self.update_norm_ratio = 0.0  # of the latest update

    def use_lowrank(self, rank: int, perturb_vectors: bool) -> LowRankNoise:
        shapes = {name: t.shape for name, t in self.master.items()}
        self.lowrank = LowRankNoise(shapes, rank, perturb_vectors, self._noise_buf.device)
        self._slots_max = 0  # low-rank factors are cheap to draw again
        return self.lowrank

    def _scratch(self, buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return buf[: like.numel()].view(like.shape)

    def _view(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        like = self.master[name]
        start = self._offsets[name]
        return flat[start : start + like.numel()].view(like.shape)

    def _free_slot(self) -> torch.Tensor | None:
        if len(self._cache) < len(self._slots):
            return self._slots[len(self._cache)]
        if len(self._slots) < self._slots_max:
            self._slots.append(
                torch.empty(self.numel, dtype=torch.float32, device=self._noise_buf.device)
            )
            return self._slots[-1]
        return None

    def _noise(self, member_seed: int, name: str) -> torch.Tensor:
        """eps(member_seed) of one tensor: from the cache, or generated into scratch."""
        cached = self._cache.get(member_seed)
        if cached is not None:
            return self._view(cached, name)
        eps = self._scratch(self._noise_buf, self.master[name])
        return self.noise.fill(eps, member_seed, name)

    def clear_noise_cache(self) -> None:
        self._cache.clear()

    def materialise(self, member_seed: int, sign: int, sigma: float) -> None:
        """eval copy <- master + sign * sigma * eps(member_seed), tensor by tensor."""
        if self.lowrank is not None:
            return self._materialise_lowrank(member_seed, sign, sigma)
        slot = None if member_seed in self._cache else self._free_slot()
        for name in self.names:
            if self.scales[name] == 0.0:  # frozen (es.perturb_only): eval copy == master
                continue
            master, target = self.master[name], self.eval_params[name]
            if slot is None:
                eps = self._noise(member_seed, name)
            else:
                eps = self.noise.fill(self._view(slot, name), member_seed, name)
            step = sign * sigma * self.scales[name]
            if target.dtype == torch.float32:
                torch.add(master, eps, alpha=step, out=target)
            else:  # round once, from the fp32 sum held in the (idle) accumulator scratch
                fp32_sum = self._scratch(self._acc_buf, master)
                target.copy_(torch.add(master, eps, alpha=step, out=fp32_sum))
        if slot is not None:
            self._cache[member_seed] = slot

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
        """master += scale * sum_k coef_k * eps(seed_k), summed in fp32 per tensor, in order.

        Also sets `update_norm_ratio` = |update| / |master after the update| (a metric)."""
        update_norms, master_norms = [], []  # kept as tensors: one device sync at the end
        for name in self.names:
            master = self.master[name]
            acc = self._update_of(name, coefficients)
            if acc is not None:
                master.add_(acc, alpha=self.scales[name])
                update_norms.append(torch.linalg.vector_norm(acc) * abs(self.scales[name]))
            master_norms.append(torch.linalg.vector_norm(master))
        update = float(torch.linalg.vector_norm(torch.stack(update_norms))) if update_norms else 0.0
        weights = float(torch.linalg.vector_norm(torch.stack(master_norms)))
        self.update_norm_ratio = update / weights if weights else 0.0
        self.clear_noise_cache()

    def _update_of(self, name: str, coefficients: list[tuple[int, float]]) -> torch.Tensor | None:
        """sum_k coef_k * eps(seed_k) of one tensor (None: nothing to add)."""
        if not coefficients or self.scales[name] == 0.0:
            return None
        if self.lowrank is not None:
            return self.lowrank.weighted_sum(name, coefficients)
        acc = self._scratch(self._acc_buf, self.master[name]).zero_()
        for seed, coef in coefficients:
            acc.add_(self._noise(seed, name), alpha=coef)
        return acc

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.master)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) ^ set(state)
        if missing:
            raise ValueError(f"checkpoint tensors do not match the model: {sorted(missing)[:5]}")
        for name in self.names:
            self.master[name].copy_(state[name])

    def checksum(self) -> str:
        return weights_checksum(self.master)


def per_tensor_std(master: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each tensor's weight std (float64): sigma and alpha scales for es.sigma_scale."""
    return {
        name: float(t.double().std()) if t.numel() > 1 else float(t.double().abs().sum())
        for name, t in master.items()
    }


def weights_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and the raw fp32 bytes of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
