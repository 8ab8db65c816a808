"""Invariant 3: evaluating members never changes the master weights."""

import pytest
import torch

from es_mpi.comm import Comm
from es_mpi.engine import Engine
from es_mpi.tasks import make_task
from es_mpi.trainer import Trainer


@pytest.mark.parametrize("eval_dtype", ["float32", "bfloat16"])
def test_master_bit_identical_after_evaluating_members(tiny_config, tmp_path, eval_dtype):
    tiny_config.model.eval_dtype = eval_dtype
    engine = Engine.load(tiny_config, Comm.serial())
    trainer = Trainer(engine, make_task(tiny_config.task), tmp_path, log=None)
    before = {k: v.clone() for k, v in engine.weights.master.items()}
    checksum = engine.weights.checksum()
    from es_mpi.strategy import member_population

    pop = member_population(0, 0, 4, antithetic=True)
    trainer.evaluate_members(range(4), pop, trainer.prompt_batch(0), tiny_config.es.sigma)
    assert engine.weights.checksum() == checksum
    for name, tensor in before.items():
        assert torch.equal(engine.weights.master[name], tensor)
    # the evaluation copy was perturbed, and load_master restores it exactly (fp32 case)
    name = engine.weights.names[0]
    assert not torch.equal(engine.weights.eval_params[name].float(), before[name])
    engine.weights.load_master()
    expected = before[name].to(engine.weights.eval_params[name].dtype)
    assert torch.equal(engine.weights.eval_params[name], expected)


def test_member_reward_independent_of_evaluation_order(tiny_config, tmp_path):
    """A member's completions depend only on (theta, seed, prompts): not on who ran before."""
    engine = Engine.load(tiny_config, Comm.serial())
    trainer = Trainer(engine, make_task(tiny_config.task), tmp_path, log=None)
    from es_mpi.strategy import member_population

    sigma = 0.5  # large enough that members generate differently
    pop = member_population(0, 0, 6, antithetic=False)
    batch = trainer.prompt_batch(0)

    def completions(n: int) -> tuple[str, ...]:
        engine.weights.materialise(int(pop.seeds[n]), int(pop.signs[n]), sigma)
        return tuple(trainer.evaluator.completions(batch))

    forward = [completions(n) for n in range(6)]
    assert len(set(forward)) > 1  # members differ, so an order effect would show
    backward = [completions(n) for n in range(5, -1, -1)]
    assert forward == backward[::-1]


def test_master_is_the_fp32_base_even_with_a_bf16_eval_copy(tiny_config):
    """The master comes from the fp32 file, not from the rounded evaluation copy."""
    from safetensors.torch import load_file

    tiny_config.model.eval_dtype = "bfloat16"
    engine = Engine.load(tiny_config, Comm.serial())
    base = load_file(str(tiny_config.model.path) + "/model.safetensors")
    for name, tensor in engine.weights.master.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, base[name])
        assert engine.weights.eval_params[name].dtype == torch.bfloat16


def test_members_are_perturbed_with_the_scheduled_sigma(tiny_config, tmp_path, monkeypatch):
    """es.sigma_schedule: iteration t perturbs with sigma x the schedule's factor at t."""
    tiny_config.es.sigma_schedule = "linear"
    tiny_config.es.sigma_final = 0.5
    tiny_config.es.sigma_decay_iterations = 4
    engine = Engine.load(tiny_config, Comm.serial())
    trainer = Trainer(engine, make_task(tiny_config.task), tmp_path, log=None)
    used: dict[int, set[float]] = {}
    materialise = engine.weights.materialise

    def recording(seed: int, sign: int, sigma: float) -> None:
        used.setdefault(iteration, set()).add(sigma)
        materialise(seed, sign, sigma)

    monkeypatch.setattr(engine.weights, "materialise", recording)
    for iteration in (0, 2, 4, 6):
        trainer.step(iteration)
    sigma = tiny_config.es.sigma
    assert used == {0: {sigma}, 2: {0.75 * sigma}, 4: {0.5 * sigma}, 6: {0.5 * sigma}}
