"""Tiny chat models of real architectures, built offline (no model hub): Qwen2, Llama-3, Gemma-3.

Each fixture has the machinery a downloaded instruct model brings: its architecture (Qwen2:
q/k/v biases, grouped KV heads, tied embeddings; Llama: rope_type llama3, untied head;
Gemma-3: scaled embeddings, sliding-window layers), a byte-level BPE tokenizer trained here
with the `tokenizers` library, the family's special tokens and chat template, and a
generation_config.json whose eos_token_id lists two ids, the first of them not the tokenizer's
eos (as an instruct model's end-of-turn token is not its tokenizer's end-of-text).
Deterministic from the seed: `make fixtures` rebuilds them byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from . import modelio  # noqa: F401  (offline environment defaults)
from .tasks.countdown import (
    PAPER_ASSISTANT_PREFIX,
    PAPER_SYSTEM,
    PAPER_USER,
    TINY_ANSWER_FORMAT,
    generate_problems,
    paper_numbers,
)

# Countdown's tags as whole tokens (ordinary tokens, kept by decoding): short completions.
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]

# Chat templates written for these fixtures in each family's turn format.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}{% else %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if loop.index0 == 1 or (loop.first and m['role'] != 'system') %}{{ ns.system }}"
    "{% endif %}{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    specials: tuple[str, ...]
    """Special tokens, first ids in this order."""
    bos: str | None
    eos: str
    """The tokenizer's eos_token (end of text)."""
    end_of_turn: str
    """First id of generation_config's eos_token_id (the instruct model's end of turn)."""
    pad: str
    chat_template: str


FAMILIES = {
    "qwen2": Family(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|endoftext|>",
        "<|im_end|>",
        "<|endoftext|>",
        CHATML,
    ),
    "llama3": Family(
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ),
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        LLAMA3,
    ),
    "gemma3": Family(
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        "<end_of_turn>",
        "<pad>",
        GEMMA3,
    ),
}


def training_corpus(seed: int, count: int = 3000) -> list[str]:
    """Text the BPE merges are learned from: Countdown problems in the paper's words and the
    short answer format, multiplication prompts, plain digits."""
    lines = [PAPER_SYSTEM, PAPER_ASSISTANT_PREFIX, "system\nuser\nassistant\nmodel\n"]
    for p in generate_problems(count, seed, (3, 4), 99):
        lines.append(PAPER_USER.format(numbers=paper_numbers(p["numbers"]), target=p["target"]))
        lines.append(" ".join(map(str, p["numbers"])) + "=" + p["target"])
        lines.append(TINY_ANSWER_FORMAT.format(solution=p["solution"]))
        a, b = p["numbers"][:2]
        lines.append(f"What is {a * 7} times {b * 13}? Answer as <{a * b * 91}>.")
    return lines


def train_tokenizer(family: Family, seed: int, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (digits split one by one, as Qwen's tokenizers do) with the family's
    special tokens; Countdown's tags added as ordinary tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        padding_side="left",
    )
    tokenizer.add_tokens(TAGS)
    tokenizer.chat_template = family.chat_template
    return tokenizer


def fixture_model(name: str, tokenizer, hidden: int, layers: int, seed: int, heads: int = 4):
    """A randomly initialised model of the family's architecture for this tokenizer."""
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "hidden_size": hidden,
        "intermediate_size": 3 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),  # grouped KV heads
        "head_dim": hidden // heads,
        "max_position_embeddings": 1024,
    }
    if name == "qwen2":
        config, cls = Qwen2Config(tie_word_embeddings=True, **ids), Qwen2ForCausalLM
    elif name == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        }
        config = LlamaConfig(tie_word_embeddings=False, rope_parameters=rope, **ids)
        cls = LlamaForCausalLM
    else:  # gemma3: 5 of every 6 layers slide (a short window, so prompts exceed it)
        config = Gemma3TextConfig(
            tie_word_embeddings=True,
            sliding_window=16,
            query_pre_attn_scalar=hidden // heads,
            layer_types=[
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)
            ],
            **ids,
        )
        cls = Gemma3ForCausalLM
    torch.manual_seed(seed)
    return cls(config)


def fixture(
    name: str,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 3,
    vocab_size: int = 640,
    heads: int = 4,
):
    """(model, tokenizer) of one family, randomly initialised, deterministic from `seed`."""
    family = FAMILIES[name]
    tokenizer = train_tokenizer(family, seed, vocab_size)
    model = fixture_model(name, tokenizer, hidden, layers, seed, heads)
    end_ids = tokenizer.convert_tokens_to_ids([family.end_of_turn, family.eos])
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_ids,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model, tokenizer


def save_fixture(model, tokenizer, out: str | Path) -> Path:
    out = Path(out)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


# Layers per family: Gemma-3's pattern needs six for one full-attention layer among five
# sliding ones.
FIXTURE_LAYERS = {"qwen2": 3, "llama3": 3, "gemma3": 6}


def build_fixture(name: str, out: str | Path, seed: int = 0) -> Path:
    """`fixture(name)` saved as an HF directory (config, weights, tokenizer, chat template,
    generation_config.json)."""
    model, tokenizer = fixture(name, seed, layers=FIXTURE_LAYERS[name])
    return save_fixture(model, tokenizer, out)
