"""Greedy decoding of Llama / Qwen2 models without `generate` (runtime.decoder: fast).

Why: on a CPU, a tiny model's `generate` spends a large share of its time outside the matrix
products (growing the KV cache by concatenation, per-step bookkeeping, attention kernels
made for long sequences); ES decodes short completions thousands of times per iteration.
This loop preallocates the KV cache (in the weights' dtype, grouped-query heads stored and
read once), fuses q/k/v and gate/up into one product each, keeps the residual stream, norms,
rotary and softmax in float32, and runs the linear layers and the attention products in the
weights' dtype (bfloat16 weights use the CPU's bf16 matrix units where it has them).

Its output has `generate`'s layout: prompt + new tokens, pad after each row's end token,
stopped when every row has ended (on any of the end ids) or after max_new_tokens. It reads
the model's parameters at each call, so an evaluation copy overwritten in place (a perturbed
member) is decoded as it is; in es.mode lowrank it adds the active members' low-rank deltas
to each product and embedding row itself (the modules' hooks never run: it reads weights,
not modules). Positions follow `generate` for left-padded prompts (attention_mask.cumsum - 1).

After the prompt, each new token is one call of a step whose shapes and addresses never
change (it attends over the whole preallocated cache with the unwritten positions masked,
and keeps its state in tensors): on a GPU that step is captured once per call in a CUDA
graph and replayed per token, one launch instead of hundreds of kernel launches from Python
(the per-token cost of a small model on a GPU). The CPU runs the same step eagerly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Architectures whose decoder layer is Llama's: pre-norm RMSNorm, rotary q/k, silu gate/up
# MLP, optional q/k/v biases (Qwen2). Rotary types whose inverse frequencies are fixed at
# start-up (the model's own rotary module computes them, llama3 scaling included); dynamic
# types recompute them with the sequence length and are left to generate.
FAST_MODEL_TYPES = ("llama", "qwen2")
FAST_ROPE_TYPES = ("default", "linear", "llama3")


def fast_decode_problem(model: nn.Module) -> str | None:
    """Why this model cannot use the fast decoder (None when it can)."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if cfg is None or model_type not in FAST_MODEL_TYPES:
        return (
            f"the fast decoder supports {', '.join(FAST_MODEL_TYPES)} models only "
            f"(this is {model_type or type(model).__name__})"
        )
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in FAST_ROPE_TYPES:
        return f"the fast decoder supports rotary types {FAST_ROPE_TYPES} (not {rope['rope_type']})"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return "the fast decoder supports silu MLPs without biases only"
    if getattr(cfg, "use_sliding_window", False) or any(
        t != "full_attention" for t in getattr(cfg, "layer_types", None) or []
    ):
        return "the fast decoder supports full attention only (not sliding windows)"
    # every projection it reads must be a plain nn.Linear (not a subclass, not an int8 copy)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for layer in model.model.layers:
        linears += [getattr(layer.self_attn, f"{n}_proj", None) for n in ("q", "k", "v", "o")]
        linears += [getattr(layer.mlp, f"{n}_proj", None) for n in ("gate", "up", "down")]
    for module in linears:
        if type(module) is not nn.Linear:
            return f"the fast decoder needs plain nn.Linear layers (found {type(module).__name__})"
    return None


def _stack_storage(linears: list[nn.Linear]) -> list[nn.Parameter]:
    """Give `linears` (same input width, dtype, device) weights that are consecutive row
    blocks of one tensor, so their fused product reads that tensor without a copy."""
    weights = [m.weight for m in linears]
    fused = torch.cat([w.detach() for w in weights])
    start, params = 0, []
    for module, w in zip(linears, weights, strict=True):
        module.weight = nn.Parameter(fused[start : start + w.shape[0]], requires_grad=False)
        params.append(module.weight)
        start += w.shape[0]
    return params


def fuse_weight_storage(model: nn.Module) -> set[int]:
    """Where the fast decoder applies: q/k/v and gate/up of every layer share one storage
    each (same values; done at load, before the master weights are attached to the
    parameters), so it fuses them without copying weights at every call. Returns the ids of
    the new parameters (empty where it does not apply)."""
    if fast_decode_problem(model) is not None:
        return set()
    new = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        new += _stack_storage([attn.q_proj, attn.k_proj, attn.v_proj])
        new += _stack_storage([mlp.gate_proj, mlp.up_proj])
    return {id(p) for p in new}


def _fused(weights: list[torch.Tensor]) -> torch.Tensor:
    """The row blocks as one matrix: a view when they are consecutive in one storage (see
    fuse_weight_storage), else a concatenated copy."""
    first = weights[0]
    rows = sum(w.shape[0] for w in weights)
    offset = first.storage_offset()
    consecutive = all(w.is_contiguous() for w in weights)
    for w in weights:
        consecutive &= (
            w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and w.storage_offset() == offset
        )
        offset += w.numel()
    if consecutive:
        return first.as_strided((rows, first.shape[1]), first.stride())
    return torch.cat(weights)


class _Product:
    """One matrix product of a layer: the row blocks of one or more modules' weights (fused),
    an optional bias, and each block's parameter name, where es.mode lowrank adds the
    active members' deltas (lowrank.PopulationHooks.add_linear_delta). float32 in and out; the
    product in the weight's dtype."""

    def __init__(self, modules: list[nn.Linear], names: dict[int, str]) -> None:
        self.weight = _fused([m.weight for m in modules])
        biases = [m.bias for m in modules]
        self.bias = None if biases[0] is None else torch.cat(biases).float()
        self.parts = [(names.get(id(m.weight), ""), m.weight.shape[0]) for m in modules]

    def __call__(self, x: torch.Tensor, population=None) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        y = F.linear(x, self.weight).float()
        if self.bias is not None:
            y = y + self.bias
        if population is not None:
            start = 0
            for name, width in self.parts:
                population.add_linear_delta(name, x, y[..., start : start + width])
                start += width
        return y


class _Layer:
    """One decoder layer's weights for this call: q/k/v and gate/up fused into one product."""

    def __init__(self, layer: nn.Module, names: dict[int, str]) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _Product([attn.q_proj, attn.k_proj, attn.v_proj], names)
        self.o = _Product([attn.o_proj], names)
        self.gate_up = _Product([mlp.gate_proj, mlp.up_proj], names)
        self.down = _Product([mlp.down_proj], names)
        self.norm_in = layer.input_layernorm.weight.float()
        self.norm_post = layer.post_attention_layernorm.weight.float()
        self.scaling = float(attn.scaling)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _Decoder:
    """The model's weights for one call and its KV cache (batch x total positions)."""

    def __init__(self, model: nn.Module, batch: int, total: int, population=None) -> None:
        cfg = model.config
        inner = model.model
        # es.mode lowrank: the members whose deltas each product adds (None: plain weights)
        self.population = population if population is not None and population.members else None
        # parameter names address the members' deltas; only then worth a walk of the model
        # (~0.3 ms at 24 layers, on every call)
        names = {} if self.population is None else {id(p): n for n, p in model.named_parameters()}
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.embed = inner.embed_tokens.weight
        self.embed_name = names.get(id(self.embed), "")
        self.lm_head = _Product([model.get_output_embeddings()], names)
        self.norm = inner.norm.weight.float()
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.rope_scale = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        self.layers = [_Layer(layer, names) for layer in inner.layers]
        # The KV cache in the weights' dtype (bf16 copies: half the bytes of float32), each
        # grouped-query key/value head stored once: no copy per query head.
        shape = (len(self.layers), batch, self.kv_heads, total, self.head_dim)
        self.cache_dtype = self.layers[0].qkv.weight.dtype
        self.keys = torch.zeros(shape, device=self.embed.device, dtype=self.cache_dtype)
        self.values = torch.zeros(shape, device=self.embed.device, dtype=self.cache_dtype)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # batch, 1, position, head_dim
        return angles.cos() * self.rope_scale, angles.sin() * self.rope_scale

    def forward(self, x, at: int | torch.Tensor, cos, sin, mask) -> torch.Tensor:
        """x: (batch, n, hidden) float32 at cache positions at..at+n; returns the final-norm
        hidden state of the last position. `at` an int: the prompt, attending over cache
        positions :at+n. `at` a 1-element tensor (n = 1): the static-shape token step,
        attending over the whole cache (`mask` hides what is not written yet), so its shapes
        and addresses are the same at every position (a CUDA graph replays it)."""
        b, n, _ = x.shape
        h, d, kvh = self.heads, self.head_dim, self.kv_heads
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(_rms(x, layer.norm_in, self.eps), self.population)
            q, k, v = qkv.view(b, n, h + 2 * kvh, d).transpose(1, 2).split([h, kvh, kvh], 1)
            k, v = _rotate(k, cos, sin).to(self.cache_dtype), v.to(self.cache_dtype)
            if isinstance(at, int):
                self.keys[i, :, :, at : at + n] = k
                self.values[i, :, :, at : at + n] = v
                keys, values = self.keys[i, :, :, : at + n], self.values[i, :, :, : at + n]
            else:
                keys, values = (
                    self.keys[i].index_copy_(2, at, k),
                    self.values[i].index_copy_(2, at, v),
                )
            out = self.attend(_rotate(q, cos, sin), keys, values, layer.scaling, mask)
            out = out.transpose(1, 2).reshape(b, n, h * d)
            x = x + layer.o(out, self.population)
            gate_up = layer.gate_up(_rms(x, layer.norm_post, self.eps), self.population)
            gate, up = gate_up.chunk(2, -1)
            x = x + layer.down(F.silu(gate) * up, self.population)
        return _rms(x[:, -1], self.norm, self.eps)

    def attend(self, q: torch.Tensor, keys, values, scaling: float, mask) -> torch.Tensor:
        """Attention of q (batch, heads, n, head_dim; float32) over keys/values (batch,
        kv_heads, positions, head_dim). Grouped-query heads: the g query heads of one
        key/value head are stacked as g x n rows of one product with that head's keys (HF's
        repeat_interleave order), so the cache is read in place. Products in the cache's
        dtype, softmax in float32."""
        b, h, n, d = q.shape
        kvh, g, end = self.kv_heads, h // self.kv_heads, keys.shape[2]
        rows = q.to(self.cache_dtype).reshape(b, kvh, g * n, d)
        scores = torch.matmul(rows, keys.transpose(-1, -2)).float().view(b, h, n, end)
        weights = torch.softmax(scores * scaling + mask, dim=-1)
        out = torch.matmul(weights.to(self.cache_dtype).view(b, kvh, g * n, end), values)
        return out.float().view(b, h, n, d)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows of the embedding (plus the members' low-rank rows)."""
        rows = self.embed[ids]
        if self.population is not None:
            delta = self.population.embedding_delta(self.embed_name, ids)
            rows = rows if delta is None else rows + delta
        return rows.float()

    def next_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden, self.population).argmax(-1)


class _TokenStep:
    """One new token per call, every shape and address fixed: the state (tokens so far,
    step index, which rows ended and when) lives in tensors the step updates in place, so
    the same call can be captured once in a CUDA graph and replayed for every position."""

    def __init__(self, dec: _Decoder, first, cos, sin, key_mask, end_ids, pad_id, steps) -> None:
        batch, device = first.shape[0], first.device
        self.dec, self.cos, self.sin, self.end_ids = dec, cos, sin, end_ids
        self.pad_id, self.prompt_len = pad_id, cos.shape[2] - steps
        self.key_mask = key_mask  # (batch, 1, 1, total): -inf at the prompt's pads
        self.key_positions = torch.arange(cos.shape[2], device=device)
        self.new = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)
        self.new[:, 0] = first
        self.ended = self.is_end(first)
        never = torch.full((batch,), steps, dtype=torch.long, device=device)
        self.ended_at = never.masked_fill(self.ended, 0)  # the step of each row's end token
        self.t = torch.ones(1, dtype=torch.long, device=device)  # the step this call writes

    def __call__(self) -> None:
        pos = self.t + (self.prompt_len - 1)  # the cache position of the previous token
        x = self.dec.embed_tokens(self.new.index_select(1, self.t - 1))
        mask = self.key_mask.masked_fill(self.key_positions > pos, float("-inf"))
        cos, sin = self.cos.index_select(2, pos), self.sin.index_select(2, pos)
        token = self.dec.next_tokens(self.dec.forward(x, pos, cos, sin, mask))
        token.masked_fill_(self.ended, self.pad_id)
        self.new.index_copy_(1, self.t, token[:, None])
        now = self.is_end(token) & ~self.ended
        self.ended_at.masked_fill_(now, 0).add_(now.long() * self.t)
        self.ended |= now
        self.t += 1

    def is_end(self, token: torch.Tensor) -> torch.Tensor:
        """Rows whose token is one of the end ids (a broadcast compare: no kernel that could
        wait for the host inside a captured graph)."""
        return (token[:, None] == self.end_ids).any(dim=1)

    def tokens(self) -> torch.Tensor:
        """The new tokens as generate returns them: up to the step where the last row
        ended (every row's tokens after its end are pad)."""
        steps = self.new.shape[1]
        last = int(self.ended_at.max()) if bool(self.ended.all()) else steps - 1
        return self.new[:, : last + 1]


def _graph_of(step: _TokenStep):
    """`step` captured in a CUDA graph after one eager call on a side stream (the warm-up
    CUDA graphs need; it is the real next step: capturing runs nothing). None if capture
    fails: the eager step runs the same kernels on the same shapes."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as err:  # e.g. a kernel that syncs with the host
        GRAPH_CAPTURES["failed"] += 1
        _warn_once(f"CUDA graph capture of the decode step failed ({err}); decoding eagerly")
        return None
    GRAPH_CAPTURES["captured"] += 1
    return graph


# How many decode calls were replayed from a CUDA graph and how many fell back to eager
# steps, in this process (read by benchmarks/gpu_check.py).
GRAPH_CAPTURES = {"captured": 0, "failed": 0}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"es-mpi: warning: {message}", flush=True)


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    end_ids: torch.Tensor | int,
    pad_token_id: int,
    cuda_graph: bool = True,
    check_every: int | None = None,
    population=None,
) -> torch.Tensor:
    """Greedy completions of left-padded prompts, laid out as `generate` returns them; a row
    ends at the first of `end_ids` (one id or a 1-D tensor of ids). On CUDA the token step is
    replayed from a CUDA graph (`cuda_graph`), and whether every row has ended is asked every
    `check_every` steps (default: 8 on CUDA, where asking waits for the GPU; 1 elsewhere);
    steps past the end are trimmed, so the result does not depend on either. `population`:
    es.mode lowrank's hooks with their active members (rows member-major), whose low-rank
    deltas every product and the embedding lookup add."""
    if max_new_tokens == 0:
        return input_ids
    step = _prompt(
        model, input_ids, attention_mask, max_new_tokens, end_ids, pad_token_id, population
    )
    on_cuda = input_ids.device.type == "cuda"
    capture = _graph_of if on_cuda and cuda_graph else None
    _run_steps(step, max_new_tokens, check_every or (8 if on_cuda else 1), capture)
    return torch.cat([input_ids, step.tokens()], dim=1)


def _prompt(model, input_ids, attention_mask, max_new_tokens, end_ids, pad_token_id, population):
    """The prompt's forward pass and first token: the token step, ready for the second."""
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    end_ids = torch.as_tensor(end_ids, device=device).reshape(-1)
    dec = _Decoder(model, batch, prompt_len + max_new_tokens, population)
    valid = attention_mask.bool()
    positions = attention_mask.long().cumsum(-1) - 1
    positions.masked_fill_(~valid, 1)
    steps = torch.arange(1, max_new_tokens + 1, device=device)
    cos, sin = dec.rotary(torch.cat([positions, positions[:, -1:] + steps], dim=1))
    # prompt: causal over valid keys; a pad row sees itself only (its output is never used,
    # but a row with no key would give NaN, and 0 x NaN in later rows is NaN)
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()
    eye = torch.eye(prompt_len, dtype=torch.bool, device=device)
    allowed = (causal & valid[:, None, :]) | eye
    prompt_mask = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))
    key_mask = torch.zeros(batch, 1, 1, prompt_len + max_new_tokens, device=device)
    key_mask[:, 0, 0, :prompt_len].masked_fill_(~valid, float("-inf"))

    x = dec.embed_tokens(input_ids)
    hidden = dec.forward(
        x, 0, cos[..., :prompt_len, :], sin[..., :prompt_len, :], prompt_mask[:, None]
    )
    first = dec.next_tokens(hidden)
    return _TokenStep(dec, first, cos, sin, key_mask, end_ids, pad_token_id, max_new_tokens)


def _run_steps(step: _TokenStep, max_new_tokens: int, check_every: int, capture) -> None:
    """Steps until every row has ended (asked every `check_every` steps) or the limit; with
    `capture` (_graph_of), the second token's step runs eagerly while the graph is captured
    and the rest are replays."""
    run, done = step, 1  # done: tokens written so far (the first came from the prompt)
    if capture is not None and max_new_tokens > 2 and not bool(step.ended.all()):
        graph = capture(step)
        run, done = (step if graph is None else graph.replay), 2
    while done < max_new_tokens:
        if (done - 1) % check_every == 0 and bool(step.ended.all()):
            break
        run()
        done += 1
