"""The fast greedy decoder (runtime.decoder: fast) against transformers' generate."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import ROOT
from es_mpi.config import ConfigError
from es_mpi.config_load import load_config
from es_mpi.decode import _Decoder, fast_decode_problem, greedy_decode
from es_mpi.evaluate import Evaluator
from es_mpi.modelio import load_model, load_tokenizer
from es_mpi.tasks import make_task


def _shipped(dtype: str = "float32"):
    """The default config's base model and task."""
    cfg = load_config(ROOT / "configs" / "default.yaml", ["task.train_size=200"])
    task = make_task(cfg.task)
    path = ROOT / cfg.model.path
    model = load_model(path, dtype, torch.device("cpu"))
    return model, load_tokenizer(path), task


def _perturb(model, seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.add_((scale * p.float().std() * noise).to(p.dtype))


@pytest.mark.parametrize("perturbed", [False, True])
def test_fast_decoder_gives_generates_tokens_on_the_shipped_model(perturbed):
    """float32: the same greedy completions as generate (the products agree to the last
    bits, which can flip a near-tie: at most 1 row in 64 may differ)."""
    torch.set_num_threads(1)
    model, tokenizer, task = _shipped()
    if perturbed:  # a member at the default's sigma: longer, odder completions
        _perturb(model, seed=3, scale=0.3)
    hf = Evaluator(model, tokenizer, task, 40, "hf")
    fast = Evaluator(model, tokenizer, task, 40, "fast")
    batch = hf.encode(task.train[:64])
    assert batch.attention_mask.min() == 0  # left padding is exercised
    expected, _ = hf.generate(batch)
    got, _ = fast.generate(batch)
    assert got.shape[1] <= expected.shape[1]  # stops when every row has ended, as generate
    width = min(got.shape[1], expected.shape[1])
    same_rows = (got[:, :width] == expected[:, :width]).all(dim=1)
    assert int(same_rows.sum()) >= 63


def test_fast_decoder_in_bfloat16_agrees_with_float32_as_well_as_generate():
    """Rounding the weights to bfloat16 changes some greedy completions of a tiny base; the
    fast decoder in bfloat16 may not change many more of them than generate does (default
    base, 3 batches of 64: 57-58 unchanged for the fast decoder, 57-59 for generate)."""
    torch.set_num_threads(1)
    model32, tokenizer, task = _shipped("float32")
    model16, _, _ = _shipped("bfloat16")
    batch = Evaluator(model32, tokenizer, task, 40).encode(task.train[:64])

    def unchanged(decoder: str) -> int:
        full = Evaluator(model32, tokenizer, task, 40, decoder).completions(batch)
        half = Evaluator(model16, tokenizer, task, 40, decoder).completions(batch)
        return sum(a == b for a, b in zip(full, half, strict=True))

    fast = unchanged("fast")
    assert fast >= 48
    assert fast >= unchanged("hf") - 2


def _random_gqa_llama(seed: int, attention_bias: bool) -> LlamaForCausalLM:
    """A random Llama with 2 key/value heads for 4 query heads (grouped-query attention)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=attention_bias,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_prompt_logits_match_generate_with_grouped_kv_heads_and_biases():
    """A random Llama with 2 key/value heads for 4 query heads and q/k/v/o biases: the
    decoder's last-position logits equal the model's own forward pass."""
    model = _random_gqa_llama(seed=0, attention_bias=True)
    ids = torch.randint(3, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        dec = _Decoder(model, 3, 7)
        cos, sin = dec.rotary(positions)
        allowed = (torch.ones(7, 7).tril().bool() & mask.bool()[:, None, :]) | torch.eye(7).bool()
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        hidden = dec.forward(model.model.embed_tokens(ids), 0, cos, sin, additive[:, None])
        got = dec.lm_head(hidden)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_static_token_steps_match_the_models_forward_pass():
    """The token step (whole-cache shapes, positions and cache writes addressed by a tensor,
    as a CUDA graph replays it), 3 steps after the prompt on a left-padded GQA batch: each
    new token is the argmax of the model's own logits over prompt + the tokens before it."""
    model = _random_gqa_llama(seed=1, attention_bias=False)
    ids = torch.randint(3, 50, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = greedy_decode(model, ids, mask, 4, end_ids=999, pad_token_id=0)
    assert out.shape == (3, 10)
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=full_mask, position_ids=positions).logits
    # each new token is the argmax of the model's logits at the position before it
    assert torch.equal(logits[:, 5:9].argmax(-1), out[:, 6:10])


def test_asking_whether_rows_ended_less_often_gives_the_same_completions():
    """The end check every 8 steps (as on a GPU) runs steps past the end and trims them: the
    same tokens and width as checking every step, with rows that end at different steps."""
    torch.set_num_threads(1)
    model, tokenizer, task = _shipped()
    _perturb(model, seed=3, scale=0.3)
    evaluator = Evaluator(model, tokenizer, task, 40, "fast")
    batch = evaluator.encode(task.train[:32])

    def decode(check_every: int) -> torch.Tensor:
        return greedy_decode(
            model,
            batch.input_ids,
            batch.attention_mask,
            40,
            evaluator._end_ids,
            evaluator.generation.pad_token_id,
            check_every=check_every,
        )

    each, lazy = decode(1), decode(8)
    assert torch.equal(each, lazy)
    new = each[:, batch.input_ids.shape[1] :]
    ended = torch.isin(new, evaluator._end_ids)
    assert new.shape[1] < 40  # every row ended before the limit: the trim decided the width
    assert len(set(ended.float().argmax(1).tolist())) > 1  # rows end at different steps


def test_graph_replays_continue_where_the_captured_step_left_off():
    """The control flow around a CUDA graph, with a stand-in capture (no GPU here: it runs the
    step once, as capturing does after its eager warm-up, and replays run the step): the
    same tokens as plain steps, one call per token; a failed capture (None) goes on with
    eager steps."""
    from es_mpi.decode import _prompt, _run_steps

    model = _random_gqa_llama(seed=2, attention_bias=False)
    ids = torch.randint(3, 50, (4, 5))
    mask = torch.ones_like(ids)
    plain = greedy_decode(model, ids, mask, 6, end_ids=999, pad_token_id=0)[:, 5:]

    class Graph:
        def __init__(self, step) -> None:
            self.step, self.replays = step, 0
            step()

        def replay(self) -> None:
            self.replays += 1
            self.step()

    graphs = []
    step = _prompt(model, ids, mask, 6, 999, 0, None)
    _run_steps(step, 6, 8, lambda s: graphs.append(Graph(s)) or graphs[-1])
    assert torch.equal(step.tokens(), plain)
    assert graphs[0].replays == 4  # tokens 3..6; token 2 came from the warm-up step
    failed = _prompt(model, ids, mask, 6, 999, 0, None)
    _run_steps(failed, 6, 1, lambda s: s() and None)
    assert torch.equal(failed.tokens(), plain)


def test_unsupported_models_and_settings_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20))
    assert "llama, qwen2 models only (this is gpt2)" in fast_decode_problem(gpt2)
    small = {"vocab_size": 20, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    biased = LlamaForCausalLM(LlamaConfig(**small, num_attention_heads=2, mlp_bias=True))
    assert "biases" in fast_decode_problem(biased)
    dynamic = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    rope = LlamaForCausalLM(LlamaConfig(**small, num_attention_heads=2, rope_parameters=dynamic))
    assert "not dynamic" in fast_decode_problem(rope)
    _, tokenizer, task = _shipped()
    with pytest.raises(ConfigError, match="'runtime.decoder'"):
        Evaluator(gpt2, tokenizer, task, 4, "fast")
    for overrides in (["es.mode=lowrank", "es.lowrank_vectors=full"], ["model.eval_dtype=int8"]):
        with pytest.raises(ConfigError, match="'runtime.decoder'"):
            load_config(None, ["runtime.decoder=fast", *overrides])
    load_config(None, ["runtime.decoder=fast", "es.mode=lowrank"])  # frozen vectors: fine
    with pytest.raises(ConfigError, match="'runtime.decoder'"):
        load_config(None, ["runtime.decoder=vllm"])
