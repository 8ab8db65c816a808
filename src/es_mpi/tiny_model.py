"""A tiny Llama with a character-level tokenizer, built from a config (for tests and CPU runs)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from . import modelio  # noqa: F401  (offline environment defaults)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+-*/()=<>,.:? \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Countdown's tags as whole tokens (as LLM tokenizers such as Qwen3's have them): a completion
# "</think>\n<answer>3+5*2</answer>" is 9 tokens instead of 31, so greedy decoding takes a
# third of the steps. Ordinary vocabulary entries, not special tokens: decoding keeps them.
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


def char_tokenizer(tag_tokens: bool = False, pad_to: int = 0) -> PreTrainedTokenizerFast:
    """One token per character (and per Countdown tag with `tag_tokens`); decode concatenates
    (no spaces inserted). `pad_to`: placeholder tokens `<xN>` up to that many ids, so every
    id of a bigger random model decodes to text (benchmarks/scale_models.py)."""
    words = SPECIALS + CHARS + (TAGS if tag_tokens else [])
    words += [f"<x{i}>" for i in range(pad_to - len(words))]
    vocab = {tok: i for i, tok in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tags = "|".join(re.escape(t) for t in TAGS) + "|" if tag_tokens else ""
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(tags + r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def tiny_llama(
    hidden: int = 128, layers: int = 4, heads: int = 4, seed: int = 0, tag_tokens: bool = False
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised tiny Llama and its char tokenizer, deterministic from `seed`."""
    tokenizer = char_tokenizer(tag_tokens)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def build_tiny_llama(
    out: str | Path, hidden: int = 128, layers: int = 4, heads: int = 4, seed: int = 0
) -> Path:
    """`tiny_llama(...)` saved as an HF directory."""
    model, tokenizer = tiny_llama(hidden, layers, heads, seed)
    out = Path(out)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
