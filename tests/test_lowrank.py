"""Low-rank ES: factors, batched hooks == materialised weights, update, config checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_overrides
from es_mpi.comm import Comm
from es_mpi.config import ConfigError
from es_mpi.config_load import load_config
from es_mpi.engine import Engine
from es_mpi.evaluate import Evaluator
from es_mpi.lowrank import LowRankNoise, PopulationHooks
from es_mpi.strategy import member_population
from es_mpi.tasks import make_task
from es_mpi.trainer import Trainer

MODELS = Path(__file__).resolve().parent.parent / "models"
SEEDS = [11, 12, 13]
SIGNS = [1, -1, 1]


def lowrank_engine(model_dir, **extra) -> Engine:
    settings = {"es.mode": "lowrank", "es.sigma": 0.3, **extra}
    cfg = load_config(None, small_overrides(model_dir, **settings))
    return Engine.load(cfg, Comm.serial())


def test_factors_have_unit_variance_entries_and_fixed_streams():
    noise = LowRankNoise({"w": torch.Size((300, 200))}, rank=4, perturb_vectors=False, device="cpu")
    dense = noise.dense(5, "w")
    assert dense.shape == (300, 200)
    assert abs(float(dense.std()) - 1.0) < 0.05  # B A^T / sqrt(r): unit-variance entries
    b, a = noise.factors(5, "w")
    assert torch.equal(dense, (b @ a.T) / 2.0)
    assert torch.equal(noise.dense(5, "w"), dense)  # same seed, same noise
    assert not torch.equal(noise.dense(6, "w"), dense)
    assert torch.linalg.matrix_rank(dense) == 4


def test_weighted_sum_matches_sum_of_dense_perturbations():
    shapes = {"w": torch.Size((7, 5)), "v": torch.Size((5,))}
    noise = LowRankNoise(shapes, rank=2, perturb_vectors=True, device="cpu")
    coefs = [(1, 0.5), (2, -0.25), (3, 2.0)]
    for name in shapes:
        expected = sum(c * noise.dense(s, name).double() for s, c in coefs)
        assert torch.allclose(noise.weighted_sum(name, coefs).double(), expected, atol=1e-5)
    frozen = LowRankNoise(shapes, rank=2, perturb_vectors=False, device="cpu")
    assert frozen.weighted_sum("v", coefs) is None and frozen.dense(1, "v") is None


@pytest.mark.parametrize(
    ("model", "rank", "vectors"),
    [
        ("tiny", 1, "frozen"),
        ("tiny", 2, "full"),
        ("tiny", 4, "frozen"),
        ("qwen2-tiny-chat", 2, "full"),
        ("llama3-tiny-chat", 2, "full"),
        ("gemma3-tiny-chat", 2, "full"),  # embedding scaled by sqrt(hidden) inside forward
    ],
)
def test_batched_hooks_equal_materialised_members(tiny_model_dir, model, rank, vectors):
    """Several members in one forward pass == each member alone on W + sigma B A^T/sqrt(r),
    on the char Llama and on the three chat fixtures (Qwen2, Llama-3, Gemma-3)."""
    settings = {"es.rank": rank, "es.lowrank_vectors": vectors}
    if model != "tiny":  # noise about the weights' own size (0.3 makes rounding chaotic)
        settings["es.sigma"] = 0.02
    engine = lowrank_engine(tiny_model_dir if model == "tiny" else MODELS / model, **settings)
    weights, model = engine.weights, engine.model
    task = make_task(engine.cfg.task)
    evaluator = Evaluator(model, engine.tokenizer, task, 6)
    batch = evaluator.encode(task.train[:4])
    sigma = engine.cfg.es.sigma

    alone_logits, alone_tokens = [], []
    for seed, sign in zip(SEEDS, SIGNS, strict=True):
        weights.materialise(seed, sign, sigma)
        with torch.no_grad():
            alone_logits.append(model(batch.input_ids, attention_mask=batch.attention_mask).logits)
        alone_tokens.append(evaluator.generate(batch)[0])
    weights.load_master()

    hooks = PopulationHooks(model, weights.lowrank)
    hooks.activate(SEEDS, SIGNS, sigma, weights.scales, torch.float32)
    many = batch.repeat(len(SEEDS))
    with torch.no_grad():
        batched_logits = model(many.input_ids, attention_mask=many.attention_mask).logits
    batched_tokens = evaluator.generate(many)[0]
    hooks.deactivate()

    assert torch.allclose(batched_logits, torch.cat(alone_logits), atol=1e-4)
    assert torch.equal(batched_tokens, torch.cat(alone_tokens))  # greedy tokens, KV cache on
    # the members really differ from each other and from the unperturbed model
    assert not torch.allclose(alone_logits[0], alone_logits[1], atol=1e-3)
    with torch.no_grad():
        plain = model(batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.allclose(plain, alone_logits[0], atol=1e-3)
    for name, t in weights.master.items():  # hooks never touch the weights
        assert torch.equal(t, weights.eval_params[name])
    hooks.remove()


@pytest.mark.parametrize("model, rank", [("qwen2-tiny-chat", 2), ("llama3-tiny-chat", 1)])
def test_fast_decoder_adds_the_members_deltas(model, rank):
    """runtime.decoder fast in es.mode lowrank: several members decoded in one batch (the
    decoder adds the hooks' deltas itself) give the tokens of each member materialised and
    decoded alone, and of generate through the hooks (Qwen2 with q/k/v biases, tied
    embedding; Llama-3 rank 1)."""
    torch.set_num_threads(1)
    engine = lowrank_engine(MODELS / model, **{"es.rank": rank, "es.sigma": 0.02})
    weights, model = engine.weights, engine.model
    task = make_task(engine.cfg.task)
    fast = Evaluator(model, engine.tokenizer, task, 8, "fast")
    batch = fast.encode(task.train[:4])
    sigma = engine.cfg.es.sigma
    alone = []
    for seed, sign in zip(SEEDS, SIGNS, strict=True):
        weights.materialise(seed, sign, sigma)
        alone.append(fast.generate(batch)[0])
    weights.load_master()
    plain = fast.generate(batch)[0]

    hooks = PopulationHooks(model, weights.lowrank)
    fast.population = hooks
    hooks.activate(SEEDS, SIGNS, sigma, weights.scales, torch.float32)
    many = batch.repeat(len(SEEDS))
    batched = fast.generate(many)[0]
    through_hooks = Evaluator(model, engine.tokenizer, task, 8, "hf").generate(many)[0]
    hooks.deactivate()
    hooks.remove()

    assert torch.equal(batched, torch.cat(alone))
    assert torch.equal(batched, through_hooks)
    assert not all(torch.equal(plain, member) for member in alone)  # the deltas change tokens


def test_update_moves_2d_weights_only_when_vectors_frozen(tiny_model_dir):
    engine = lowrank_engine(tiny_model_dir)
    before = {n: t.clone() for n, t in engine.weights.master.items()}
    engine.weights.apply_update([(1, 0.1), (2, -0.1)])
    for name, t in engine.weights.master.items():
        assert torch.equal(t, before[name]) == (t.dim() == 1), name


def test_member_rewards_do_not_depend_on_group_size(tiny_model_dir, tmp_path):
    """members_per_batch 1 and 3 give the same per-member rewards (greedy on the tiny model;
    16 prompts, so that some member of the random model scores)."""
    rewards = {}
    for group in (1, 3):
        settings = {"es.members_per_batch": group, "task.prompts_per_member": 16}
        engine = lowrank_engine(tiny_model_dir, **settings)
        trainer = Trainer(engine, make_task(engine.cfg.task), tmp_path, None)
        population = member_population(0, 0, 6, antithetic=True)
        batch = trainer.prompt_batch(0)
        sigma = engine.cfg.es.sigma
        rewards[group], _ = trainer.evaluate_members(range(6), population, batch, sigma)
    assert np.allclose(rewards[1], rewards[3])
    assert len(set(rewards[1])) > 1  # the members are told apart


def test_config_checks(tiny_model_dir):
    with pytest.raises(ConfigError, match="es.members_per_batch"):
        load_config(None, small_overrides(tiny_model_dir, **{"es.members_per_batch": 4}))
    with pytest.raises(ConfigError, match="es.mode"):
        load_config(None, small_overrides(tiny_model_dir, **{"es.mode": "sparse"}))
    with pytest.raises(ConfigError, match="es.rank"):
        load_config(None, small_overrides(tiny_model_dir, **{"es.rank": 0}))


def test_unit_scale_of_lowrank_matches_full_noise():
    noise = LowRankNoise({"w": torch.Size((64, 64))}, rank=16, perturb_vectors=False, device="cpu")
    stds = [float(noise.dense(s, "w").std()) for s in range(20)]
    assert abs(np.mean(stds) - 1.0) < 0.05


def _materialised_vs_batched(model, rank: int, vectors: bool, input_ids: torch.Tensor):
    from es_mpi.perturb import MasterWeights

    weights = MasterWeights(model)
    noise = weights.use_lowrank(rank, perturb_vectors=vectors)
    alone = []
    for seed, sign in zip(SEEDS, SIGNS, strict=True):
        weights.materialise(seed, sign, 0.05)
        with torch.no_grad():
            alone.append(model(input_ids).logits)
    weights.load_master()
    hooks = PopulationHooks(model, noise)
    hooks.activate(SEEDS, SIGNS, 0.05, weights.scales, torch.float32)
    with torch.no_grad():
        batched = model(input_ids.repeat(len(SEEDS), 1)).logits
    hooks.remove()
    return torch.cat(alone), batched


def test_qwen2_with_biases_and_perturbed_vectors():
    """Qwen2 (q/k/v biases, untied head): batched hooks == materialised members."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    assert any(n.endswith("q_proj.bias") for n, _ in model.named_parameters())
    ids = torch.randint(0, 50, (3, 7))
    alone, batched = _materialised_vs_batched(model, 1, True, ids)
    assert torch.allclose(alone, batched, atol=1e-4)


def test_gpt2_conv1d_is_refused_naming_the_module():
    from transformers import GPT2Config, GPT2LMHeadModel

    from es_mpi.perturb import MasterWeights

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    weights = MasterWeights(model)
    with pytest.raises(TypeError, match="transformer.h.0.attn.c_attn.*Conv1D"):
        PopulationHooks(model, weights.use_lowrank(1, perturb_vectors=False))
