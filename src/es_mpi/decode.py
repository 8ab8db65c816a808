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
member) is decoded as it is. Positions follow `generate` for left-padded prompts
(attention_mask.cumsum - 1).
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


class _Layer:
    """One decoder layer's weights for this call: q/k/v and gate/up fused into one matrix."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _fused([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        self.qkv_bias = None if biases[0] is None else torch.cat(biases).float()
        self.o = attn.o_proj.weight
        self.o_bias = attn.o_proj.bias
        self.gate_up = _fused([mlp.gate_proj.weight, mlp.up_proj.weight])
        self.down = mlp.down_proj.weight
        self.norm_in = layer.input_layernorm.weight.float()
        self.norm_post = layer.post_attention_layernorm.weight.float()
        self.scaling = float(attn.scaling)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """float32 in and out; the product in the weight's dtype."""
    y = F.linear(x.to(weight.dtype), weight).float()
    return y if bias is None else y + bias.float()


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _Decoder:
    def __init__(self, model: nn.Module, batch: int, total: int) -> None:
        cfg = model.config
        inner = model.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.embed = inner.embed_tokens.weight
        self.lm_head = model.get_output_embeddings().weight
        self.norm = inner.norm.weight.float()
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.rope_scale = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        self.layers = [_Layer(layer) for layer in inner.layers]
        # The KV cache in the weights' dtype (bf16 copies: half the bytes of float32), each
        # grouped-query key/value head stored once: no copy per query head.
        shape = (len(self.layers), batch, self.kv_heads, total, self.head_dim)
        self.cache_dtype = self.layers[0].qkv.dtype
        self.keys = torch.zeros(shape, device=self.embed.device, dtype=self.cache_dtype)
        self.values = torch.zeros(shape, device=self.embed.device, dtype=self.cache_dtype)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # batch, 1, position, head_dim
        return angles.cos() * self.rope_scale, angles.sin() * self.rope_scale

    def forward(self, x, start: int, cos, sin, mask) -> torch.Tensor:
        """x: (batch, n, hidden) float32 at cache positions start..start+n; returns the
        final-norm hidden state of the last position."""
        b, n, _ = x.shape
        end = start + n
        h, d, kvh = self.heads, self.head_dim, self.kv_heads
        for i, layer in enumerate(self.layers):
            qkv = _linear(_rms(x, layer.norm_in, self.eps), layer.qkv, layer.qkv_bias)
            q, k, v = qkv.view(b, n, h + 2 * kvh, d).transpose(1, 2).split([h, kvh, kvh], 1)
            self.keys[i, :, :, start:end] = _rotate(k, cos, sin)
            self.values[i, :, :, start:end] = v
            out = self.attend(_rotate(q, cos, sin), i, end, layer.scaling, mask)
            out = out.transpose(1, 2).reshape(b, n, h * d)
            x = x + _linear(out, layer.o, layer.o_bias)
            gate, up = _linear(_rms(x, layer.norm_post, self.eps), layer.gate_up).chunk(2, -1)
            x = x + _linear(F.silu(gate) * up, layer.down)
        return _rms(x[:, -1], self.norm, self.eps)

    def attend(self, q: torch.Tensor, i: int, end: int, scaling: float, mask) -> torch.Tensor:
        """Attention of q (batch, heads, n, head_dim; float32) over cache positions :end of
        layer i. Grouped-query heads: the g query heads of one key/value head are stacked as
        g x n rows of one product with that head's keys (HF's repeat_interleave order), so
        the cache is read in place. Products in the cache's dtype, softmax in float32."""
        b, h, n, d = q.shape
        kvh, g = self.kv_heads, h // self.kv_heads
        keys, values = self.keys[i, :, :, :end], self.values[i, :, :, :end]
        rows = q.to(self.cache_dtype).reshape(b, kvh, g * n, d)
        scores = torch.matmul(rows, keys.transpose(-1, -2)).float().view(b, h, n, end)
        weights = torch.softmax(scores * scaling + mask, dim=-1)
        out = torch.matmul(weights.to(self.cache_dtype).view(b, kvh, g * n, end), values)
        return out.float().view(b, h, n, d)

    def next_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return _linear(hidden, self.lm_head).argmax(-1)


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    end_ids: torch.Tensor | int,
    pad_token_id: int,
) -> torch.Tensor:
    """Greedy completions of left-padded prompts, laid out as `generate` returns them; a row
    ends at the first of `end_ids` (one id or a 1-D tensor of ids)."""
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    end_ids = torch.as_tensor(end_ids, device=device).reshape(-1)
    dec = _Decoder(model, batch, prompt_len + max_new_tokens)
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

    x = dec.embed[input_ids].float()
    hidden = dec.forward(
        x, 0, cos[..., :prompt_len, :], sin[..., :prompt_len, :], prompt_mask[:, None]
    )
    new = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        token = dec.next_tokens(hidden).masked_fill_(ended, pad_token_id)
        new[:, t] = token
        ended |= torch.isin(token, end_ids)
        if t == max_new_tokens - 1 or bool(ended.all()):
            return torch.cat([input_ids, new[:, : t + 1]], dim=1)
        pos = prompt_len + t
        hidden = dec.forward(
            dec.embed[token][:, None].float(),
            pos,
            cos[..., pos : pos + 1, :],
            sin[..., pos : pos + 1, :],
            key_mask[..., : pos + 1],
        )
    return input_ids  # max_new_tokens == 0
