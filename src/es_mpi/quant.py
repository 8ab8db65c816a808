"""Weight-only int8 evaluation copy (model.eval_dtype int8, full-parameter mode).

Each nn.Linear whose weight is its own (not tied to an embedding) is replaced by an
Int8Linear holding int8 weights and one fp32 scale per output channel (symmetric, max-abs
/ 127). A member's perturbed weights are computed in fp32 from the master, then quantised
into that layer: the master never sees the rounding. Everything else stays float32.
On CPU the forward converts the int8 weight to the activation dtype on the fly: it saves
memory (1 byte per weight instead of 4), not time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.in_features, self.out_features = in_features, out_features
        device = linear.weight.device
        self.register_buffer("qweight", torch.zeros_like(linear.weight, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, device=device))
        self.bias = linear.bias
        self.quantise(linear.weight.detach().float())

    @torch.no_grad()
    def quantise(self, weight: torch.Tensor) -> None:
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.qweight.copy_(torch.round(weight / scale[:, None]).clamp_(-127, 127))
        self.scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = functional.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8Target:
    """What MasterWeights writes a member's fp32 weights into: `copy_` quantises them."""

    dtype = torch.int8

    def __init__(self, module: Int8Linear) -> None:
        self.module = module
        self.device = module.qweight.device
        self.shape = module.qweight.shape

    def copy_(self, weight: torch.Tensor) -> Int8Target:
        self.module.quantise(weight)
        return self

    def requires_grad_(self, flag: bool) -> Int8Target:
        return self


def quantise_linears(model: nn.Module) -> dict[str, Int8Target]:
    """Swap every untied nn.Linear for an Int8Linear; returns {weight name: target}."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets: dict[str, Int8Target] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child.weight) not in tied:
                layer = Int8Linear(child)
                setattr(parent, child_name, layer)
                prefix = f"{parent_name}." if parent_name else ""
                targets[f"{prefix}{child_name}.weight"] = Int8Target(layer)
    return targets
