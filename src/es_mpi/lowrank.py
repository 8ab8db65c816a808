"""Low-rank ES (EGGROLL, arXiv 2511.16652): the population in one batched forward pass.

Member i's perturbation of a 2-D weight W (m x n) is E_i = B_i A_i^T / sqrt(r), with
B_i (m x r) and A_i (n x r) standard normal from (member seed, tensor name): each entry of
E_i has unit variance, like full-parameter noise. E_i is never materialised during
evaluation: forward hooks on nn.Linear and nn.Embedding add each member's delta to the rows
of the batch that belong to it (rows are member-major: member k owns rows k*P .. k*P+P-1),
    Linear:    y = x W^T + c_i (x A_i) B_i^T
    Embedding: y = f(W)[t] + f(c_i B_i A_i^T)[t]
with c_i = sign_i * sigma * scale(tensor) / sqrt(r). The master weights stay untouched.
The perturbation lives in weight space whatever the module does with its weight in
`forward`: an embedding that scales its lookup (Gemma-3 multiplies by sqrt(hidden_size))
scales the delta alike. f is read off the module itself, by running it on a weight of ones
(a stride-0 view, no memory), and checked once at start-up to be a per-element factor on
the lookup; a module that does anything else with its weight is refused.
1-D tensors (norms, biases) are frozen or perturbed with full noise (es.lowrank_vectors); a
perturbed 1-D tensor of a module other than a Linear bias is handled by running that module
once per member on the member's rows with its own vector (torch.func.functional_call).
Modules holding other 2-D weights (e.g. GPT-2's Conv1D) are refused with a clear error.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from .noise import NEW_RUN_KIND, NoiseSource, accumulate, float32, separately_rounded


class LowRankNoise:
    """Factors B, A of (member seed, tensor name) and the dense perturbations they stand for."""

    def __init__(
        self,
        shapes: dict[str, torch.Size],
        rank: int,
        perturb_vectors: bool,
        device,
        kind: str = NEW_RUN_KIND,
    ) -> None:
        self.shapes = shapes
        self.rank = rank
        self.perturb_vectors = perturb_vectors
        self.noise = NoiseSource(device, kind)
        self.device = device
        # counter kind: the update in elementwise float32 operations (device-independent)
        self.elementwise = separately_rounded(kind)

    def is_perturbed(self, name: str) -> bool:
        return len(self.shapes[name]) == 2 or self.perturb_vectors

    def factors(self, seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B m x r, A n x r) of a 2-D tensor: one float32 draw of fixed shape (m + n, r)."""
        m, n = self.shapes[name]
        both = self.noise.sample(seed, name, torch.Size((m + n, self.rank)), self.device)
        return both[:m], both[m:]

    def vector(self, seed: int, name: str) -> torch.Tensor:
        """Full noise of a 1-D tensor (es.lowrank_vectors: full)."""
        return self.noise.sample(seed, name, self.shapes[name], self.device)

    def dense(self, seed: int, name: str) -> torch.Tensor | None:
        """The perturbation of one tensor as a dense float32 tensor (None: frozen)."""
        if len(self.shapes[name]) == 2:
            b, a = self.factors(seed, name)
            return (b @ a.T) / math.sqrt(self.rank)
        return self.vector(seed, name) if self.perturb_vectors else None

    def weighted_sum(self, name: str, coefficients: list[tuple[int, float]]) -> torch.Tensor | None:
        """sum_k coef_k * E(seed_k) of one tensor in fp32, the same on every rank. Counter
        kind: one correctly rounded operation per product and per sum, in member then rank
        order (the same bits on any device); older kinds: one matrix product
        [c_1 B_1 .. c_K B_K] [A_1 .. A_K]^T / sqrt(r)."""
        if not self.is_perturbed(name) or not coefficients:
            return None
        if len(self.shapes[name]) == 1:
            acc = torch.zeros(self.shapes[name], dtype=torch.float32, device=self.device)
            product = torch.empty_like(acc) if self.elementwise else None
            for seed, coef in coefficients:
                accumulate(acc, self.vector(seed, name), coef, product)
            return acc
        if self.elementwise:
            return self._outer_sum(name, coefficients)
        bs, as_ = [], []
        for seed, coef in coefficients:
            b, a = self.factors(seed, name)
            bs.append(b * coef)
            as_.append(a)
        return (torch.cat(bs, dim=1) @ torch.cat(as_, dim=1).T) / math.sqrt(self.rank)

    def _outer_sum(self, name: str, coefficients: list[tuple[int, float]]) -> torch.Tensor:
        """sum_k sum_j (c_k / sqrt(r) * b_kj) a_kj^T by broadcasting, no GEMM: a GEMM's
        summation order and fusion depend on the device and library."""
        m, n = self.shapes[name]
        acc = torch.zeros((m, n), dtype=torch.float32, device=self.device)
        term = torch.empty((m, n), dtype=torch.float32, device=self.device)
        for seed, coef in coefficients:
            b, a = self.factors(seed, name)
            b = b * float32(coef / math.sqrt(self.rank))
            for j in range(self.rank):
                acc.add_(torch.mul(b[:, j : j + 1], a[:, j], out=term))
        return acc


class PopulationHooks:
    """Forward hooks that turn one model into a population of perturbed members.

    `activate(seeds, signs, sigma, scales, rows_per_member)` sets the members of the next
    forward passes (batch rows grouped by member); `deactivate()` restores the plain model.
    """

    def __init__(self, model: nn.Module, noise: LowRankNoise) -> None:
        self.noise = noise
        self.members: int = 0
        self._b: dict[str, torch.Tensor] = {}  # name -> [M, m, r], times c_i
        self._a: dict[str, torch.Tensor] = {}  # name -> [M, n, r]
        self._bt: dict[str, torch.Tensor] = {}  # name -> [M, r, m] (Linear's orientation)
        self._at: dict[str, torch.Tensor] = {}  # name -> [M, r, n]
        self._vec: dict[str, torch.Tensor] = {}  # name -> [M, len] scaled vector noise
        self._handles = []
        self._linear: dict[str, list[nn.Module]] = {}
        self._embedding: dict[str, list[nn.Module]] = {}
        self._bias_of: dict[int, str] = {}  # id(Linear) -> name of its bias
        self._in_vector_call = False
        self._in_probe = False
        name_of = {id(p): name for name, p in model.named_parameters()}
        for module_name, module in model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(module, nn.Linear):
                self._hook(module, self._linear_hook, name_of[id(module.weight)], self._linear)
                if module.bias is not None:
                    self._bias_of[id(module)] = name_of[id(module.bias)]
            elif isinstance(module, nn.Embedding):
                self._check_lookup_factor(module_name, module)
                self._hook(
                    module, self._embedding_hook, name_of[id(module.weight)], self._embedding
                )
            elif any(p.dim() == 2 for p in own.values()):
                raise TypeError(
                    f"es.mode lowrank supports nn.Linear and nn.Embedding weights; module "
                    f"'{module_name}' ({type(module).__name__}) holds another 2-D weight"
                )
            elif noise.perturb_vectors and any(p.dim() == 1 for p in own.values()):
                vectors = {k: name_of[id(p)] for k, p in own.items() if p.dim() == 1}
                self._handles.append(module.register_forward_hook(self._vector_hook(vectors)))
        # named_parameters() drops tied duplicates: a weight shared by an Embedding and a
        # Linear (tied lm_head) gets one name, hence one perturbation for both uses.

    def _hook(self, module, hook, name: str, registry: dict) -> None:
        registry.setdefault(name, []).append(module)
        self._handles.append(module.register_forward_hook(self._named(hook, name)))

    @staticmethod
    def _named(hook, name: str):
        return lambda module, args, output: hook(name, module, args, output)

    def activate(
        self,
        seeds: list[int],
        signs: list[int],
        sigma: float,
        scales: dict[str, float],
        dtype: torch.dtype,
    ) -> None:
        """Draw the factors of these members once; every later forward pass uses them."""
        self.members = len(seeds)
        root_r = math.sqrt(self.noise.rank)
        for name in set(self._linear) | set(self._embedding):
            if not scales[name]:  # frozen tensor: its hooks add nothing
                continue
            bs, as_ = zip(*(self.noise.factors(s, name) for s in seeds), strict=True)
            coef = torch.tensor(
                [sign * sigma * scales[name] / root_r for sign in signs], dtype=torch.float32
            ).view(-1, 1, 1)
            b = torch.stack(bs) * coef.to(bs[0].device)  # [M, m, r]
            a = torch.stack(as_)  # [M, n, r]
            # in the activations' dtype: the hooks add to outputs of that dtype
            self._b[name] = b.to(dtype)
            self._bt[name] = self._b[name].transpose(1, 2).contiguous()  # [M, r, m]
            self._a[name] = a.to(dtype)
            self._at[name] = self._a[name].transpose(1, 2).contiguous()  # [M, r, n]
        self._vec = {}
        if self.noise.perturb_vectors:
            for name, shape in self.noise.shapes.items():
                if len(shape) == 1 and scales[name]:
                    self._vec[name] = torch.stack(
                        [
                            sign * sigma * scales[name] * self.noise.vector(s, name)
                            for s, sign in zip(seeds, signs, strict=True)
                        ]
                    )

    def deactivate(self) -> None:
        self.members = 0
        self._b, self._bt, self._a, self._at, self._vec = {}, {}, {}, {}, {}

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """[M*P, ..., d] -> [M, P*..., d]: the rows of each member side by side."""
        if x.shape[0] % self.members:
            raise RuntimeError(
                f"batch of {x.shape[0]} rows does not split into {self.members} members"
            )
        return x.reshape(self.members, -1, x.shape[-1])

    def add_linear_delta(self, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += c_i (x A_i) B_i^T for the active members, in place: x (rows member-major,
        last dim the input width) is a Linear's input and out (..., m) its output, or the
        column block of a fused output (the fast decoder). Nothing when no member perturbs
        this weight. The hooks and the fast decoder both use it."""
        if not self.members or name not in self._a:
            return
        rows = self._rows(x)
        out_rows = out.view(self.members, -1, out.shape[-1])
        if self.noise.rank == 1:
            # rank 1: batched matrix-vector products are slow on CPU; the same sums as
            # elementwise products, ~4x faster here: out += (x . a_i) (c_i b_i)^T
            xa = (rows * self._at[name]).sum(dim=-1, keepdim=True)  # [M, rows, 1]
            out_rows.addcmul_(xa, self._bt[name])
        elif out.dtype == rows.dtype:  # the add fused into the product
            out_rows.baddbmm_(torch.bmm(rows, self._a[name]), self._bt[name])
        else:  # (a float32 output of bf16 products: the fast decoder)
            out_rows.add_(torch.bmm(torch.bmm(rows, self._a[name]), self._bt[name]))

    def embedding_delta(self, name: str, ids: torch.Tensor) -> torch.Tensor | None:
        """The rows c_i (B_i A_i^T)[t] the active members add to a plain lookup of `ids`
        (rows member-major), shaped (*ids.shape, width). None when not perturbed."""
        if not self.members or name not in self._a:
            return None
        member_ids = ids.reshape(self.members, -1)  # [M, P*L]
        member = torch.arange(self.members, device=ids.device).unsqueeze(1)
        b_rows = self._b[name][member, member_ids]  # [M, P*L, r]
        delta = torch.bmm(b_rows, self._a[name].transpose(1, 2))  # [M, P*L, n]
        return delta.reshape(*ids.shape, delta.shape[-1])

    def _linear_hook(self, name: str, module: nn.Linear, args, output: torch.Tensor):
        bias = self._bias_of.get(id(module))
        if not self.members or (name not in self._a and bias not in self._vec):
            return None
        output = output.contiguous()  # (already is: then this is the same tensor)
        self.add_linear_delta(name, args[0], output)
        if bias in self._vec:
            self._rows(args[0])  # (the row count check)
            rows = output.view(self.members, -1, output.shape[-1])
            rows.add_(self._vec[bias].to(output.dtype).unsqueeze(1))
        return output

    def _lookup_factor(self, module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """What `module.forward` multiplies a looked-up row by, per output element: its output
        for a weight of ones."""
        ones = torch.ones((1, 1), dtype=module.weight.dtype, device=module.weight.device)
        self._in_probe = True  # functional_call runs this module's hooks again
        try:
            return functional_call(module, {"weight": ones.expand_as(module.weight)}, (ids,))
        finally:
            self._in_probe = False

    @torch.no_grad()
    def _check_lookup_factor(self, module_name: str, module: nn.Embedding) -> None:
        """Refuse an embedding whose forward is not lookup x factor (the delta could not be
        applied in weight space from its output alone)."""
        if type(module) is nn.Embedding:
            return
        ids = torch.arange(min(4, module.num_embeddings), device=module.weight.device)[None]
        expected = self._lookup_factor(module, ids) * module.weight[ids]
        if not torch.allclose(module(ids), expected, rtol=1e-3, atol=1e-6):
            raise TypeError(
                f"es.mode lowrank: embedding '{module_name}' ({type(module).__name__}) does more "
                "in forward than scale its looked-up rows; its perturbation cannot be applied "
                "in weight space (use es.mode full)"
            )

    def _embedding_hook(self, name: str, module: nn.Embedding, args, output: torch.Tensor):
        if self._in_probe or (delta := self.embedding_delta(name, args[0])) is None:
            return None
        if type(module) is not nn.Embedding:  # a plain lookup has factor 1: skip the product
            delta = delta * self._lookup_factor(module, args[0])
        return output + delta

    def _vector_hook(self, vectors: dict[str, str]):
        """Run the module once per member with its own perturbed 1-D parameters."""

        def hook(module: nn.Module, args, output):
            active = {local: name for local, name in vectors.items() if name in self._vec}
            if not self.members or not active or self._in_vector_call:
                return None  # (functional_call below re-enters this hook)
            self._rows(args[0])  # checks the row count
            x = args[0].reshape(self.members, -1, *args[0].shape[1:])
            parts = []
            self._in_vector_call = True
            try:
                for i in range(self.members):
                    params = {
                        local: getattr(module, local) + self._vec[name][i].to(x.dtype)
                        for local, name in active.items()
                    }
                    parts.append(functional_call(module, params, (x[i],)))
            finally:
                self._in_vector_call = False
            return torch.cat(parts).reshape(output.shape)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
