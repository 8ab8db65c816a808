"""fp32 master weights, the evaluation copy, and the ES update.

The master weights are never perturbed in place (DESIGN.md, invariant 3 / defect 2): a member
is evaluated on the model's own parameters (the evaluation copy, in any dtype), overwritten
tensor by tensor with master + sign * sigma * eps. Updates accumulate in fp32 (defect 3).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .noise import NoiseSource


class MasterWeights:
    """The trainable state of a run: one fp32 tensor per named parameter of the model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # named_parameters() drops tied duplicates (e.g. lm_head tied to the embedding).
        self.eval_params: dict[str, torch.Tensor] = {
            name: p for name, p in model.named_parameters()
        }
        for p in self.eval_params.values():
            p.requires_grad_(False)
        self.names = list(self.eval_params)
        self.master: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32).clone() for name, p in self.eval_params.items()
        }
        device = next(iter(self.master.values())).device
        self.noise = NoiseSource(device)
        largest = max(t.numel() for t in self.master.values())
        # Two scratch buffers of the largest tensor: noise, and the update accumulator.
        self._noise_buf = torch.empty(largest, dtype=torch.float32, device=device)
        self._acc_buf = torch.empty(largest, dtype=torch.float32, device=device)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.master.values())

    def _scratch(self, buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return buf[: like.numel()].view(like.shape)

    def materialise(self, member_seed: int, sign: int, sigma: float) -> None:
        """eval copy <- master + sign * sigma * eps(member_seed), tensor by tensor."""
        for name in self.names:
            master, target = self.master[name], self.eval_params[name]
            eps = self.noise.fill(self._scratch(self._noise_buf, master), member_seed, name)
            if target.dtype == torch.float32:
                torch.add(master, eps, alpha=sign * sigma, out=target)
            else:
                eps.mul_(sign * sigma).add_(master)
                target.copy_(eps)

    def load_master(self) -> None:
        """eval copy <- master (unperturbed), e.g. before saving or a held-out evaluation."""
        for name in self.names:
            self.eval_params[name].copy_(self.master[name])

    def apply_update(self, coefficients: list[tuple[int, float]]) -> None:
        """master += sum_k coef_k * eps(seed_k), summed in fp32 per tensor, in the given order."""
        if not coefficients:
            return
        for name in self.names:
            master = self.master[name]
            acc = self._scratch(self._acc_buf, master).zero_()
            eps = self._scratch(self._noise_buf, master)
            for seed, coef in coefficients:
                acc.add_(self.noise.fill(eps, seed, name), alpha=coef)
            master.add_(acc)

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


def weights_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and the raw fp32 bytes of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
