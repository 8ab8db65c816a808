"""Random models with real configurations for `benchmarks/scale.py` (bf16 safetensors), with a
character tokenizer padded to the model's vocabulary size by placeholder tokens `<xN>`: every
id a random model emits decodes to text, so rewards on the text differ between members.

Weights are N(0, 0.02) from a fixed seed, norms 1, biases 0: the cost of ES depends on the
shapes, not on what the weights have learned.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from es_mpi.tiny_model import char_tokenizer

# name -> (model class, config class, config fields): dimensions of published models.
SPECS = {
    # SmolLM-135M's dimensions (Llama architecture, tied embedding).
    "llama-135m": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
            rope_theta=10000.0,
        ),
    ),
    # Qwen2.5-0.5B's dimensions (tied 151,936 x 896 embedding, q/k/v biases).
    "qwen2.5-0.5b": (
        Qwen2ForCausalLM,
        Qwen2Config,
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
        ),
    ),
}


def build_random_model(name: str, out: Path, seed: int = 0) -> Path:
    """Write model `name` of SPECS to `out` (skipped when `out` already holds it)."""
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    model_cls, config_cls, fields = SPECS[name]
    tokenizer = char_tokenizer(pad_to=fields["vocab_size"])
    config = config_cls(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **fields,
    )
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.tie_weights()  # to_empty gave the tied lm_head a storage of its own
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            elif pname.endswith(".bias"):
                p.zero_()
            else:  # drawn in float32 (fixed shape), then rounded
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    model.config.dtype = torch.bfloat16
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
